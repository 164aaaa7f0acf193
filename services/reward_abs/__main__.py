"""`python -m services.reward_abs --model-path PATH [--host 127.0.0.1] [--port 8002] [...]`

Every flag is also an environment variable (`--max-wait-ms` == `CRS_MAX_WAIT_MS`); see --help.
"""

from __future__ import annotations

import sys

from services.reward.main import serve
from services.reward_abs.app import create_app
from services.reward_abs.settings import RewardAbsSettings


def main(argv: list[str] | None = None) -> int:
    return serve(RewardAbsSettings, create_app, argv, prog="python -m services.reward_abs")


if __name__ == "__main__":
    sys.exit(main())
