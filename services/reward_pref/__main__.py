"""`python -m services.reward_pref --model-path PATH [--host 127.0.0.1] [--port 8001] [...]`

Every flag is also an environment variable (`--max-wait-ms` == `CRS_MAX_WAIT_MS`); see --help.
"""

from __future__ import annotations

import sys

from services.reward.main import serve
from services.reward_pref.app import create_app
from services.reward_pref.settings import RewardPrefSettings


def main(argv: list[str] | None = None) -> int:
    return serve(RewardPrefSettings, create_app, argv, prog="python -m services.reward_pref")


if __name__ == "__main__":
    sys.exit(main())
