"""`python -m services.policy_gen --backend vllm|hf --model-path PATH [--port 8000] ...`

hf: this process loads the model and serves. vllm: this process starts vLLM on a private
loopback port, serves the API itself on --port and forwards to it; if vLLM exits, so do we
(with its exit code), and when we are told to stop (SIGTERM/SIGINT) vLLM is stopped too.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from services.common.process import free_port
from services.common.settings import settings_or_exit
from services.policy_gen.settings import PolicyGenSettings
from services.policy_gen.vllm_launcher import scrub_own_cmdline

log = logging.getLogger("services.policy_gen")


def _serve(app, settings: PolicyGenSettings):
    import uvicorn

    from services.common.serving import uvicorn_config

    return uvicorn.Server(uvicorn_config(app, settings))


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    settings = settings_or_exit(PolicyGenSettings, argv, prog="python -m services.policy_gen")
    scrub_own_cmdline(settings.api_key)  # a key given as --api-key leaves the process list
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.policy_gen.app import create_app

    if settings.backend == "hf":
        from services.policy_gen.hf_backend import HFBackend

        _serve(create_app(settings, HFBackend(settings)), settings).run()
        return 0

    from services.policy_gen.proxy import VLLMProxyBackend
    from services.policy_gen.vllm_launcher import VLLMServer

    vllm = VLLMServer(settings, settings.vllm_port or free_port()).start()
    server = _serve(create_app(settings, VLLMProxyBackend(settings, vllm.url)), settings)
    died = threading.Event()

    def watchdog() -> None:
        # vLLM gone (or never healthy) => the front door has nothing to serve: stop uvicorn.
        deadline, healthy = time.monotonic() + settings.vllm_startup_timeout_s, False
        while not server.should_exit:
            if vllm.returncode() is not None:
                log.error("vLLM exited with code %s; shutting down", vllm.returncode())
                break
            if not healthy:
                healthy = _healthy(vllm.url)
                if not healthy and time.monotonic() > deadline:
                    log.error("vLLM was not healthy within %.0fs; shutting down", settings.vllm_startup_timeout_s)
                    break
            died.wait(0.5)
        else:
            return
        died.set()
        server.should_exit = True

    def forward(signum, _frame) -> None:
        # Forward at once so vLLM shuts down alongside uvicorn. Also: uvicorn re-raises the
        # signal after its shutdown, and this handler (not the default) is what then runs,
        # so the `finally` below still gets to wait for vLLM.
        vllm.signal(signum)
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    threading.Thread(target=watchdog, name="vllm-watchdog", daemon=True).start()
    try:
        server.run()
    finally:
        code = vllm.stop()
    return (code or 1) if died.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
