"""Run a reward service under uvicorn: shared by `python -m services.reward_pref|reward_abs`."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from fastapi import FastAPI

from services.common.reward_settings import RewardServiceSettings
from services.common.settings import settings_or_exit


def serve(
    cls: type[RewardServiceSettings],
    create_app: Callable[[RewardServiceSettings], FastAPI],
    argv: Sequence[str] | None,
    prog: str,
) -> int:
    import uvicorn

    settings = settings_or_exit(cls, argv, prog=prog)
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # Per-request access lines cost real time at thousands of requests/s; /metrics counts them instead.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        access_log=level == "DEBUG", timeout_graceful_shutdown=10,
    )
    return 0
