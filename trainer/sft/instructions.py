"""Instruction data for the pre-SFT stage: Alpaca, Dolly and GSM8K files by path -> conversations.

The thesis fine-tuned on instruction data before Open Assistant. Formats, told apart by the
keys of the first record (or named with ``format``):

- Alpaca (``alpaca_data.json``: a JSON list): ``instruction``, ``input`` (may be empty), ``output``;
- Dolly (``databricks-dolly-15k.jsonl``): ``instruction``, ``context`` (may be empty), ``response``;
- GSM8K (``train.jsonl``): ``question``, ``answer`` (the worked solution ending ``#### N``, kept whole).

An input/context is appended to the instruction after a blank line, so the user turn holds the
whole task. Each becomes one ``[user, assistant]`` conversation.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

FORMATS = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "gsm8k": ("question", None, "answer"),
}


def _records(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(stripped)
    else:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list or JSONL of objects")
    return data


def detect_format(record: dict[str, Any]) -> str:
    for name, (prompt, _, answer) in FORMATS.items():
        if prompt in record and answer in record:
            return name
    raise ValueError(f"unrecognised instruction record with keys {sorted(record)}; expected Alpaca "
                     "(instruction/input/output), Dolly (instruction/context/response) or GSM8K (question/answer)")


def load_instructions(path: str | Path, fmt: str = "auto", max_examples: int | None = None) -> list[list[dict]]:
    """One instruction file -> ``[[{"role": "user", ...}, {"role": "assistant", ...}], ...]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data not found: {path} (pre_sft.paths lists Alpaca/Dolly/GSM8K files)")
    records = _records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    name = detect_format(records[0]) if fmt == "auto" else fmt
    if name not in FORMATS:
        raise ValueError(f"unknown instruction format {fmt!r}; use auto, {', '.join(FORMATS)}")
    prompt_key, extra_key, answer_key = FORMATS[name]
    out = []
    for i, r in enumerate(records[:max_examples] if max_examples else records):
        try:
            prompt, answer = str(r[prompt_key]).strip(), str(r[answer_key]).strip()
        except KeyError as e:
            raise ValueError(f"{path}: record {i} ({name} format) lacks {e.args[0]!r}") from None
        extra = str(r.get(extra_key) or "").strip() if extra_key else ""
        if prompt and answer:
            user = f"{prompt}\n\n{extra}" if extra else prompt
            out.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return out
