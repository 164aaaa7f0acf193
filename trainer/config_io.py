"""Load a pydantic config from YAML plus dotted ``--set key=value`` overrides.

Every training command (`train-sft`, `train-rm`, `train`) takes `--config FILE`,
`--output-dir DIR` and `--set a.b=c`; this is the one implementation. Configs forbid
unknown keys, so a typo in YAML or in `--set` is an error that names the key.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    pass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), **extra: Any) -> C:
    """Read YAML (optional), apply overrides and keyword fields, validate into `cls`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    data = apply_overrides(data, overrides)
    data.update({k: v for k, v in extra.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n{e}") from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config next to the run's outputs (YAML, JSON-compatible values)."""
    Path(path).write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))


def add_config_args(parser: argparse.ArgumentParser, *, output_dir: bool = True) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=False, help="YAML config file")
    if output_dir:
        parser.add_argument("--output-dir", help="where to write the run (overrides the config's output_dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.epochs=2 (repeatable)",
    )
    return parser
