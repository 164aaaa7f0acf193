"""`crs-rlhf train --config run.yaml [--set key=value ...] [--output-dir DIR] [--resume]`

The services must already run (see configs/tiny/ppo.yaml for the fields to point at them);
policy_gen needs `--adapter-root` at (or above) RUN/adapters so it may load each step's adapter.
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.config_io import ConfigError, add_config_args, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-rlhf train", description="PPO with the Combined Reward Signal (Ray).")
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/latest (same step numbering)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.ppo.config import PPOConfig

    overrides = list(args.overrides) + ([f"run.output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        cfg = load_config(PPOConfig, args.config, overrides)
    except ConfigError as e:
        print(f"crs-rlhf train: {e}", file=sys.stderr)
        return 2
    if not cfg.services.policy_url:
        print("crs-rlhf train: services.policy_url is not set (start policy_gen and pass --set services.policy_url=...)", file=sys.stderr)
        return 2
    from trainer.ppo.driver import train

    summary = train(cfg, resume=args.resume)
    last = summary.metrics[-1] if summary.metrics else {}
    print(f"steps {summary.first_step}..{summary.last_step}{' (interrupted, checkpoint saved)' if summary.interrupted else ''}"
          f"  reward/crs {last.get('reward/crs')}  kl/objective {last.get('kl/objective')}  run {summary.run_dir}")
    return 130 if summary.interrupted else 0
