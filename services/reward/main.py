"""Run a reward service under uvicorn: shared by `python -m services.reward_pref|reward_abs`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from fastapi import FastAPI

from services.common.settings import settings_or_exit
from services.reward.settings import RewardServiceSettings


def serve(
    cls: type[RewardServiceSettings],
    create_app: Callable[[RewardServiceSettings], FastAPI],
    argv: Sequence[str] | None,
    prog: str,
) -> int:
    import uvicorn

    from services.common.serving import uvicorn_config

    settings = settings_or_exit(cls, argv, prog=prog)
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # Per-request access lines cost real time at thousands of requests/s; /metrics counts them instead.
    server = uvicorn.Server(uvicorn_config(
        app, settings, log_level=settings.log_level.lower(), access_log=level == "DEBUG", timeout_graceful_shutdown=10,
    ))  # fmt: skip
    failed = threading.Event()

    def exit_on_failed_load() -> None:
        # A model that cannot load will not load on its own: exit 1 so Docker's restart policy
        # or the kubelet restarts us (with backoff) and the failure shows as a crash, not a hang.
        service = getattr(app.state, "service", None)
        while not server.should_exit and not failed.wait(0.5):
            if getattr(service, "load_error", None):
                logging.getLogger(__name__).error("exiting: the model failed to load: %s", service.load_error)
                failed.set()
                server.should_exit = True

    threading.Thread(target=exit_on_failed_load, name="load-watch", daemon=True).start()
    server.run()
    return 1 if failed.is_set() else 0
