"""What annotators rank: prompts with one response per model, and each annotator's order.

Inputs are AlpacaEval-format files `DIR/outputs/NAME.json` (a JSON list of {"id",
"instruction", "output", "generator", "dataset"}). The prompts are chosen like this:
  - `DIR/prompts.jsonl` exists: the ids of its rows whose "split" equals the split asked for
    (`--prompts-split human`), in file order; every model must have an output for each;
  - no prompts.jsonl, or split "all": every id that all the models' outputs share, in the
    first model's order.
Orders are seeded by sha256(seed, group, annotator[, prompt]) so an annotator sees the same
order after a reload or a restart, and different annotators see different ones.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.io import iter_jsonl


@dataclass(frozen=True)
class Prompt:
    id: str
    instruction: str
    outputs: dict[str, str]  # model -> response text


def _read_outputs(path: Path, model: str) -> dict[str, dict]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no outputs for model {model!r} (run 'crs-rlhf eval generate' first, or check --models)"
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected an AlpacaEval list of outputs") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{'id', 'instruction', 'output'}} rows")  # noqa: TRY004
    out = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
            raise ValueError(f"{path}: row {i} needs 'instruction' and 'output'")
        out[str(row.get("id", i))] = row
    return out


def _split_ids(path: Path, split: str) -> list[str]:
    ids, seen_splits = [], set()
    for n, row in iter_jsonl(path):  # bad lines raise EvalInputError (a ValueError) naming path:line
        if "id" not in row:
            raise ValueError(f"{path}:{n}: a prompt row needs an 'id'")
        seen_splits.add(row.get("split"))
        if row.get("split") == split:
            ids.append(str(row["id"]))
    if not ids:
        found = ", ".join(sorted(str(s) for s in seen_splits))
        raise ValueError(
            f"{path}: no prompts with split {split!r} (splits in the file: {found}); "
            "use --prompts-split all for every prompt"
        )
    return ids


def load_prompts(directory: str | Path, models: Sequence[str], split: str = "human") -> list[Prompt]:
    directory = Path(directory)
    if len(models) < 2 or len(set(models)) != len(models):
        raise ValueError(f"--models needs at least two distinct model names, got {list(models)}")
    outputs = {m: _read_outputs(directory / "outputs" / f"{m}.json", m) for m in models}
    prompts_file = directory / "prompts.jsonl"
    if prompts_file.exists() and split != "all":
        ids = _split_ids(prompts_file, split)
        for m in models:
            missing = [i for i in ids if i not in outputs[m]]
            if missing:
                raise ValueError(
                    f"{directory}/outputs/{m}.json has no output for {len(missing)} prompt(s) of split {split!r} "
                    f"(first: {missing[0]}); generate them or pick another split"
                )
    else:
        first = outputs[models[0]]
        ids = [i for i in first if all(i in outputs[m] for m in models[1:])]
        if not ids:
            raise ValueError(f"the outputs of {', '.join(models)} in {directory}/outputs share no prompt id")
    return [
        Prompt(
            id=i,
            instruction=str(outputs[models[0]][i]["instruction"]),
            outputs={m: str(outputs[m][i]["output"]) for m in models},
        )
        for i in ids
    ]


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def prompt_sequence(seed: int, group: str, annotator: str, prompt_ids: Sequence[str]) -> list[str]:
    """The order in which one annotator meets the prompts."""
    ids = list(prompt_ids)
    _rng(seed, group, annotator).shuffle(ids)
    return ids


def response_order(seed: int, group: str, annotator: str, prompt_id: str, models: Sequence[str]) -> list[str]:
    """The order in which one annotator sees the models' responses to one prompt."""
    order = list(models)
    _rng(seed, group, annotator, prompt_id).shuffle(order)
    return order
