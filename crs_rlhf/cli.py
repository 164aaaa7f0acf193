"""`crs-rlhf`: one entry point, one sub-command per job.

Each sub-command lives in its own module with a ``main(argv) -> int``; this file only maps
names to modules and imports lazily, so `crs-rlhf --help` is instant and a CPU-only install
never imports vLLM or Ray for a command that does not need them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("crs_rlhf.demo", "the main job: tiny models, SFT + reward models, reward/policy services, PPO"),
    "import-gguf": ("crs_rlhf.import_gguf", "a GGUF checkpoint (or a package shipping one) -> a Hugging Face folder"),
    "make-tiny-models": ("crs_rlhf.tiny_models", "write tiny local models (policy, reward_pref, reward_abs)"),
    "serve": ("crs_rlhf.serve", "run a service: reward-pref | reward-abs | reward-shared | policy-gen"),
    "train-sft": ("trainer.sft.cli", "supervised fine-tuning on OASST threads"),
    "train-rm": ("trainer.rm.cli", "train a reward model: preference | absolute"),
    "train": ("trainer.ppo.cli", "PPO with the Combined Reward Signal (Ray)"),
    "plot": ("crs_rlhf.plot", "draw a PPO run's figures as PNG"),
    "sweep": ("crs_rlhf.sweep", "a grid of PPO runs (e.g. CRS weights) sharing one set of services"),
    "eval": ("evaluation.cli", "evaluation: prompts, generate, judge, rm-score, rm-bench, report, annotate, rank"),
    "data-report": ("trainer.data.report", "counts and label figures of an Open Assistant export"),
    "config-docs": ("crs_rlhf.config_docs", "write docs/config.md from the configs' field descriptions (--check: is it stale?)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: crs-rlhf COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'crs-rlhf COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"crs-rlhf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
