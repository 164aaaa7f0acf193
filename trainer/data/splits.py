"""The one held-out split of an OASST export: the trees no stage trains on, that evaluation uses.

A tree is held out when ``sha256(f"{seed}:{tree_id}")``, read as a fraction in [0, 1), is below
`fraction` (default 0.1, seed 0). The rule depends on the tree id alone, so the same tree is
held out in every export (the ``ready`` and the ``all`` export the thesis trained from) and
under every filter (languages, tree states): SFT, both reward models, PPO and `crs-rlhf eval`
cannot disagree about it.

The split is written once per data export as ``<export>.splits.json`` beside the data (or at
the stage's ``split_file``): fraction, seed, the export's sha256 and the held-out tree ids.
Every stage reads it; a file written for other data (a changed export) or with another
fraction/seed than the stage asks for is an error, never a silent re-split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from trainer.config_base import Section
from trainer.data.oasst import MessageTree

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1  # the thesis's evaluation drew from trees no stage trained on
HELD_OUT_SEED = 0
FORMAT = "crs-rlhf-splits/1"
RULE = "held out iff int(sha256(f'{seed}:{tree_id}')[:16 hex], 16) / 2**64 < fraction"


class SplitMismatchError(ValueError):
    """A split file that does not belong to this data or disagrees with the stage's settings."""


class HeldOutOptions(Section):
    """The held-out evaluation trees, as every stage's data section names them."""

    held_out_fraction: float = Field(
        HELD_OUT_FRACTION, ge=0, lt=1, description="share of TREES kept out of training for evaluation (the split "
        "file's; 0 = none: the stage then trains on the evaluation trees, with a warning)")
    held_out_seed: int = Field(HELD_OUT_SEED, description="seed of the held-out split (the split file's)")
    split_file: str | None = Field(
        None, description="the split file; default: '<data>.splits.json' beside the data (written on first use)")


def is_held_out(tree_id: str, fraction: float, seed: int = HELD_OUT_SEED) -> bool:
    """Whether `tree_id` is an evaluation tree (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}:{tree_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def data_sha256(path: Path) -> str:
    """sha256 of the export's bytes (of every file, by relative name, for a folder)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def default_split_file(data: Path) -> Path:
    return data.with_name(data.name + ".splits.json")


@dataclass(frozen=True)
class HeldOutSplit:
    fraction: float
    seed: int
    tree_ids: frozenset[str]  # held-out trees of the export (any state, any language)
    path: Path | None  # the split file read or written (None: no file, fraction 0 or a hub name)

    def train(self, trees: Sequence[MessageTree]) -> list[MessageTree]:
        return [t for t in trees if t.tree_id not in self.tree_ids]

    def held_out(self, trees: Sequence[MessageTree]) -> list[MessageTree]:
        return [t for t in trees if t.tree_id in self.tree_ids]


def _rule_ids(trees: Sequence[MessageTree], fraction: float, seed: int) -> frozenset[str]:
    return frozenset(t.tree_id for t in trees if is_held_out(t.tree_id, fraction, seed))


def write_split_file(path: Path, data: Path, trees: Sequence[MessageTree], fraction: float, seed: int,
                     sha: str | None = None) -> HeldOutSplit:
    ids = _rule_ids(trees, fraction, seed)
    doc = {"format": FORMAT, "data": data.name, "data_sha256": sha or data_sha256(data), "fraction": fraction,
           "seed": seed, "rule": RULE, "n_trees": len(trees), "held_out_tree_ids": sorted(ids)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # whole or absent, even with two stages starting
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return HeldOutSplit(fraction, seed, ids, path)


def read_split_file(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SplitMismatchError(f"{path}: not a readable split file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("held_out_tree_ids"), list):
        raise SplitMismatchError(f"{path}: not a {FORMAT} split file")
    return doc


def held_out_split(data: str | Path, trees: Sequence[MessageTree], opts: HeldOutOptions | None = None) -> HeldOutSplit:
    """The export's held-out split: read from its split file, or computed and written there first.

    `data` is the export the stage loaded `trees` from (a file or a `save_to_disk` folder; a hub
    name gets no file unless ``opts.split_file`` names one). Raises SplitMismatchError when the
    file was written for other data or with another fraction / seed than `opts`."""
    opts = opts or HeldOutOptions()
    if opts.held_out_fraction == 0:
        log.warning("held_out_fraction 0: this stage trains on every tree, the evaluation trees included")
        return HeldOutSplit(0.0, opts.held_out_seed, frozenset(), None)
    path = Path(data)
    local = path.exists()
    split_path = Path(opts.split_file) if opts.split_file else (default_split_file(path) if local else None)
    if split_path is None:  # a hub name: the rule alone (same ids as any file written for it would hold)
        return HeldOutSplit(opts.held_out_fraction, opts.held_out_seed, _rule_ids(trees, opts.held_out_fraction,
                                                                                   opts.held_out_seed), None)
    sha = data_sha256(path) if local else None
    if not split_path.is_file():
        try:
            split = write_split_file(split_path, path, trees, opts.held_out_fraction, opts.held_out_seed, sha)
        except OSError as e:  # e.g. a read-only /data mount
            raise SplitMismatchError(
                f"cannot write the held-out split of {path} to {split_path} ({e.strerror or e}): set the stage's "
                "split_file to a writable path, and the same path in every other stage and eval command") from None
        log.info("wrote the held-out split of %s to %s (%d trees held out)", path, split_path, len(split.tree_ids))
        return split
    doc = read_split_file(split_path)
    if sha is not None and doc.get("data_sha256") != sha:
        raise SplitMismatchError(
            f"{split_path} was written for other data ({doc.get('data')!r}, sha256 {str(doc.get('data_sha256'))[:12]}…) "
            f"than {path} (sha256 {sha[:12]}…): the held-out trees may no longer be held out. Point the stage at "
            "the export the split belongs to, or move the split file away to split this export afresh (results "
            "are then not comparable with runs on the old split)")
    if (float(doc["fraction"]), int(doc["seed"])) != (opts.held_out_fraction, opts.held_out_seed):
        raise SplitMismatchError(
            f"{split_path} holds out fraction {doc['fraction']} with seed {doc['seed']}, but this stage asks for "
            f"held_out_fraction {opts.held_out_fraction}, held_out_seed {opts.held_out_seed}: set the stage's values "
            "to the file's (every stage must hold out the same trees)")
    return HeldOutSplit(float(doc["fraction"]), int(doc["seed"]), frozenset(doc["held_out_tree_ids"]), split_path)
