"""`crs-rlhf train-sft --config FILE [--output-dir DIR] [--set k=v ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.config_io import ConfigError, add_config_args, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-rlhf train-sft", description="supervised fine-tuning on OASST threads")
    add_config_args(parser)
    args = parser.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trainer.sft import SFTConfig, train_sft

    try:
        out = train_sft(load_config(SFTConfig, args.config, args.overrides, output_dir=args.output_dir))
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"crs-rlhf train-sft: {e}", file=sys.stderr)
        return 2
    if main_rank:
        print(f"model written to {out} (metrics.json, config.yaml, README.md beside it)")
    return 0
