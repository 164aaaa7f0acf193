"""Read Open Assistant exports in their real formats into message trees.

Accepted inputs (see docs/training.md):
- the trees JSONL export (``*.trees.jsonl`` or ``.jsonl.gz``): one tree per line,
  ``{"message_tree_id", "tree_state", "prompt": {message, "replies": [...]}}``, labels as
  ``{name: {"value", "count"}}``;
- the flat message table (parquet, or JSONL/JSONL.gz with one message per line), trees rebuilt
  from ``parent_id``; labels as a list of ``{name, value, count}``, as Hugging Face's struct of
  lists ``{"name": [...], "value": [...], "count": [...]}``, or as the dict form;
- a Hugging Face ``datasets`` name (``OpenAssistant/oasst1``) or a ``save_to_disk`` folder, for
  users with network access (all splits are read; split by tree yourself).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Label:
    value: float
    count: int


@dataclass
class Message:
    """One OASST message; `replies` holds its children in export order."""

    message_id: str
    parent_id: str | None
    text: str
    role: str  # 'prompter' | 'assistant'
    lang: str = ""
    rank: int | None = None  # 0 = best sibling; None when the siblings were not ranked
    deleted: bool = False
    synthetic: bool = False
    review_result: bool | None = None
    labels: dict[str, Label] = field(default_factory=dict)
    replies: list[Message] = field(default_factory=list)

    def walk(self) -> Iterator[Message]:
        yield self
        for child in self.replies:
            yield from child.walk()


@dataclass
class MessageTree:
    tree_id: str
    tree_state: str
    root: Message

    @property
    def lang(self) -> str:
        return self.root.lang

    def size(self) -> int:
        return sum(1 for _ in self.root.walk())


class OasstFormatError(ValueError):
    pass


# --------------------------------------------------------------------------- field parsing


def parse_labels(raw: Any) -> dict[str, Label]:
    """Normalise the three label encodings found in OASST files to ``{name: Label}``."""
    if raw is None:
        return {}
    if isinstance(raw, dict) and set(raw) >= {"name", "value"} and isinstance(raw["name"], (list, tuple)):
        counts = raw.get("count") or [0] * len(raw["name"])  # HF parquet: struct of lists
        return {n: Label(float(v), int(c)) for n, v, c in zip(raw["name"], raw["value"], counts)}
    if isinstance(raw, dict):  # trees export: {name: {value, count}}
        return {n: Label(float(d["value"]), int(d.get("count", 0))) for n, d in raw.items()}
    if isinstance(raw, (list, tuple)):  # flat JSONL: [{name, value, count}]
        return {d["name"]: Label(float(d["value"]), int(d.get("count", 0))) for d in raw}
    raise OasstFormatError(f"unrecognised labels field: {type(raw).__name__}")


def _rank(raw: Any) -> int | None:
    # Parquet stores rank as a float column with NaN for "not ranked".
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    return int(raw)


def message_from_dict(d: dict[str, Any]) -> Message:
    try:
        return Message(
            message_id=str(d["message_id"]),
            parent_id=d.get("parent_id") or None,
            text=d["text"],
            role=d["role"],
            lang=d.get("lang") or "",
            rank=_rank(d.get("rank")),
            deleted=bool(d.get("deleted") or False),
            synthetic=bool(d.get("synthetic") or False),
            review_result=d.get("review_result"),
            labels=parse_labels(d.get("labels")),
        )
    except KeyError as e:
        raise OasstFormatError(f"message is missing field {e.args[0]!r}: {str(d)[:200]}") from None


def _tree_message(d: dict[str, Any], parent_id: str | None) -> Message:
    msg = message_from_dict({**d, "parent_id": d.get("parent_id", parent_id)})
    msg.replies = [_tree_message(r, msg.message_id) for r in d.get("replies") or []]
    return msg


# --------------------------------------------------------------------------- formats


def trees_from_export(records: Iterable[dict[str, Any]]) -> list[MessageTree]:
    """Trees JSONL export lines -> trees (nested ``replies`` kept in their order)."""
    trees = []
    for rec in records:
        if "prompt" not in rec:
            raise OasstFormatError("a trees-export line needs a 'prompt' field (is this the flat message table?)")
        root = _tree_message(rec["prompt"], None)
        trees.append(MessageTree(str(rec.get("message_tree_id") or root.message_id), rec.get("tree_state", ""), root))
    return trees


def trees_from_messages(rows: Iterable[dict[str, Any]]) -> list[MessageTree]:
    """Flat message rows -> trees rebuilt from ``parent_id``; children keep row order.

    Rows whose parent is missing from the table are dropped with their subtrees, as the
    official export does for messages under deleted parents.
    """
    rows = list(rows)
    msgs = {str(r["message_id"]): message_from_dict(r) for r in rows}
    states: dict[str, str] = {}
    roots: dict[str, Message] = {}
    order: list[str] = []
    children: dict[str, list[Message]] = defaultdict(list)
    for r in rows:
        m = msgs[str(r["message_id"])]
        tree_id = str(r.get("message_tree_id") or m.message_id)
        if r.get("tree_state"):
            states.setdefault(tree_id, r["tree_state"])
        if m.parent_id is None:
            roots[tree_id] = m
            order.append(tree_id)
        else:
            children[m.parent_id].append(m)
    for parent_id, kids in children.items():
        if parent_id in msgs:
            msgs[parent_id].replies = kids
    return [MessageTree(t, states.get(t, ""), roots[t]) for t in order]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_hf(name: str) -> list[dict[str, Any]]:
    # Code path for users with network access (or a save_to_disk folder); never used in tests.
    import datasets

    ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    splits = ds.values() if isinstance(ds, datasets.DatasetDict) else [ds]
    return [row for split in splits for row in split]


def load_oasst(path_or_name: str | Path) -> list[MessageTree]:
    """Load OASST trees from a trees export, a flat table, or a `datasets` name/folder."""
    path = Path(path_or_name)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return trees_from_messages(pq.read_table(path).to_pylist())
        if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            records = _read_jsonl(path)
            if records and "prompt" in records[0]:
                return trees_from_export(records)
            return trees_from_messages(records)
        raise OasstFormatError(f"{path}: expected .jsonl[.gz] (trees or messages) or .parquet")
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json")):
        return trees_from_messages(_load_hf(str(path)))
    if not path.exists() and "/" in str(path_or_name) and not str(path_or_name).startswith((".", "/")):
        return trees_from_messages(_load_hf(str(path_or_name)))
    raise OasstFormatError(f"no OASST data at {path_or_name!s} (not a file, a datasets folder or a hub name)")
