"""`crs-rlhf train-rm preference|absolute --config FILE [--output-dir DIR] [--set k=v ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.config_io import ConfigError, add_config_args, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-rlhf train-rm", description="train a reward model on OASST data")
    parser.add_argument("kind", choices=["preference", "absolute"])
    add_config_args(parser)
    args = parser.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trainer.rm import AbsoluteRMConfig, PreferenceRMConfig, train_absolute_rm, train_preference_rm

    cls, run = (PreferenceRMConfig, train_preference_rm) if args.kind == "preference" else (AbsoluteRMConfig, train_absolute_rm)
    try:
        cfg = load_config(cls, args.config, args.overrides, output_dir=args.output_dir)
        out = run(cfg)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"crs-rlhf train-rm {args.kind}: {e}", file=sys.stderr)
        return 2
    if main_rank:
        print(f"model written to {out} (metrics.json, config.yaml, README.md beside it)")
    return 0
