"""`python -m services.reward_shared --base-path BASE --pref-adapter DIR --abs-adapter DIR
[--host 127.0.0.1] [--pref-port 8001] [--abs-port 8002] [...]`

Memory-saving mode (docs/reward_services.md): both reward models as two LoRA adapters on ONE loaded
base, served behind the two unchanged HTTP contracts on two ports from one process -- two
uvicorn servers in one asyncio loop, each app from the shared reward app factory. The apps'
own lifespan (which would load a merged model each) is off; this module loads the shared
model and attaches an engine and a batcher to each app's service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from services.common.protocol import RewardKind
from services.common.settings import settings_or_exit
from services.reward.app import RewardService, build_app
from services.reward_shared.engine import AdapterSpec, load_shared_engines
from services.reward_shared.settings import RewardSharedSettings

log = logging.getLogger("services.reward_shared")
KINDS: tuple[RewardKind, ...] = ("preference", "absolute")


async def load(settings: RewardSharedSettings, services: dict[str, RewardService]) -> None:
    specs = [AdapterSpec(k, settings.adapter(k), services[k].engine_options()) for k in KINDS]
    try:
        engines = await asyncio.to_thread(load_shared_engines, settings.base_path, specs)
        for kind in KINDS:
            await asyncio.to_thread(engines[kind].warmup)
    except Exception as exc:  # both services report it on /health, as a single service does
        log.exception("loading the shared reward model failed")
        for service in services.values():
            service.load_error = f"{type(exc).__name__} (the details are in the server log)"
        return
    for kind in KINDS:
        services[kind].attach_engine(engines[kind])


class _Server:
    """uvicorn.Server without its own signal capture: two servers in one loop would each
    replace the other's handler, so one SIGTERM handler here stops both."""

    @staticmethod
    def make(app, settings, port: int):
        import uvicorn

        from services.common.serving import uvicorn_config

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        level = settings.log_level
        config = uvicorn_config(
            app, settings, port=port, lifespan="off", log_level=level.lower(),
            access_log=level.upper() == "DEBUG", timeout_graceful_shutdown=10,
        )
        return Server(config)


async def run(settings: RewardSharedSettings) -> None:
    per_kind = {k: settings.for_kind(k) for k in KINDS}
    apps = {k: build_app(per_kind[k], k) for k in KINDS}
    services = {k: apps[k].state.service for k in KINDS}
    servers = [_Server.make(apps[k], settings, per_kind[k].port) for k in KINDS]

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])
    loader = asyncio.create_task(load(settings, services))
    try:
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        loader.cancel()
        for service in services.values():
            if service.batcher is not None:
                await service.batcher.stop()


def main(argv: list[str] | None = None) -> int:
    prog = "python -m services.reward_shared"
    settings = settings_or_exit(RewardSharedSettings, argv, prog=prog)
    if settings.pref_port == settings.abs_port and settings.pref_port != 0:
        print(f"{prog}: --pref-port and --abs-port must differ", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
