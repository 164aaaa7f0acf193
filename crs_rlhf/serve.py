"""`crs-rlhf serve reward-pref|reward-abs|policy-gen [flags]`: same as `python -m services.X`."""

from __future__ import annotations

import importlib
import sys

SERVICES = {
    "reward-pref": "services.reward_pref.__main__",
    "reward-abs": "services.reward_abs.__main__",
    "policy-gen": "services.policy_gen.__main__",
    # Both reward models as two LoRA adapters on one loaded base, on two ports (docs/reward_services.md).
    "reward-shared": "services.reward_shared.__main__",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SERVICES:
        print(f"usage: crs-rlhf serve {{{'|'.join(SERVICES)}}} [--help] [flags]", file=sys.stderr)
        return 2
    # The CLI is glue, not library code: importing the service here keeps one code path
    # with `python -m services.X` (which is what containers and the demo run).
    module = importlib.import_module(SERVICES[argv[0]])
    return int(module.main(argv[1:]) or 0)
