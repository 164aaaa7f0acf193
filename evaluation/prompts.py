"""Evaluation prompt sets: loaders for the formats people have on disk, stratified seeded splits.

Every loader returns `Prompt(id, source, messages, category)`; `messages` ends with the
user's turn. Formats (detected from the file's content):

    fastchat   question.jsonl of Vicuna / MT-Bench: question_id, category, turns (user turns;
               a multi-turn question is evaluated on its first turn, as MT-Bench's turn 1)
    alpaca     AlpacaEval's eval set: a JSON list of {instruction, dataset}
    hh         Anthropic HH-RLHF: chosen/rejected "\\n\\nHuman: … \\n\\nAssistant: …" dialogues;
               the prompt is the dialogue up to the last Human turn
    oasst      an Open Assistant export; only its HELD-OUT trees (the data's split file, the trees
               SFT, both reward models and PPO leave out), ready for export, in the thesis's
               languages (en, es, fr, de), one single-turn prompt per tree (the root message)
    plain      JSONL with `prompt` (Koala's test set has this shape) or `messages`

Sampling (`sample_splits`) shuffles each source with one seed and deals prompts round-robin
over the sources into the named splits in order, so splits are stratified and never overlap.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.io import EvalInputError, iter_jsonl, read_json

OASST_EVAL_LANGS = ("en", "es", "fr", "de")  # the reward models' (and the thesis's) languages


@dataclass(frozen=True)
class Prompt:
    id: str
    source: str
    messages: list[dict[str, str]]
    category: str | None = None
    split: str | None = field(default=None, compare=False)

    def to_row(self) -> dict:
        row = {"id": self.id, "source": self.source, "messages": self.messages}
        if self.category is not None:
            row["category"] = self.category
        if self.split is not None:
            row["split"] = self.split
        return row


def _user(text) -> dict[str, str]:
    return {"role": "user", "content": text}


def _check_messages(messages, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise EvalInputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise EvalInputError(f"{where}: each message needs role system|user|assistant and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise EvalInputError(f"{where}: the last message must be a non-empty user turn (what the policy answers)")
    return out


def _text(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise EvalInputError(f"{where}: '{key}' must be a non-empty string")
    return v


def load_fastchat(path: Path, source: str) -> list[Prompt]:
    out = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise EvalInputError(f"{where}: FastChat questions need 'turns', a list of user turns")
        qid = row.get("question_id", lineno)
        out.append(Prompt(f"{source}/{qid}", source, [_user(turns[0])], row.get("category")))
    return out


def load_alpaca(path: Path, source: str) -> list[Prompt]:
    data = read_json(path)
    if not isinstance(data, list):
        raise EvalInputError(f"{path}: AlpacaEval's eval set is a JSON list of {{instruction, dataset}}")
    out = []
    for i, row in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise EvalInputError(f"{where}: expected an object with 'instruction'")
        out.append(Prompt(f"{source}/{i}", source, [_user(_text(row, "instruction", where))], row.get("dataset")))
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d' -> the turns up to the last
    Human turn: [user a, assistant b, user c]."""
    parts = _HH_TURN.split(text)
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
             for who, body in zip(parts[1::2], parts[2::2])]
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    return turns[: last_user + 1]


def load_hh(path: Path, source: str) -> list[Prompt]:
    out = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        turns = parse_hh_dialogue(_text(row, "chosen", where))
        if not turns or not turns[-1]["content"]:
            raise EvalInputError(f"{where}: no '\\n\\nHuman:' turn found in 'chosen'")
        out.append(Prompt(f"{source}/{lineno}", source, turns))
    return out


def load_plain(path: Path, source: str) -> list[Prompt]:
    out = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in row:
            messages = _check_messages(row["messages"], where)
        elif "prompt" in row:
            messages = [_user(_text(row, "prompt", where))]
        else:
            raise EvalInputError(f"{where}: a plain prompt row needs 'prompt' (a string) or 'messages'")
        out.append(Prompt(f"{source}/{row.get('id', lineno)}", source, messages, row.get("category")))
    return out


def load_oasst_eval(path: str | Path, source: str, split_file: str | None = None) -> list[Prompt]:
    """One single-turn prompt (the root message) per held-out tree that is ready for export and
    in OASST_EVAL_LANGS. The held-out trees come from the export's split file (written on first
    use with the default fraction 0.1 and seed 0, the trainers' defaults); a file that belongs
    to other data is an error (trainer.data.splits)."""
    kept = held_out_eval_trees(path, split_file)
    return [Prompt(f"{source}/{t.tree_id}", source, [_user(t.root.text)], t.lang) for t in kept
            if t.root.role == "prompter" and t.root.text.strip()]


def held_out_eval_trees(path: str | Path, split_file: str | None = None) -> list:
    """The export's held-out trees in OASST_EVAL_LANGS ("fixture" = the shipped fixture): what
    every evaluation on OASST reads, so prompts and human-ranked pairs come from one split."""
    from trainer.data import filter_trees, fixture_path, load_oasst
    from trainer.data.splits import HeldOutOptions, SplitMismatchError, held_out_split

    data = fixture_path() if str(path) == "fixture" else path
    trees = load_oasst(data)
    try:
        held = held_out_split(data, trees, HeldOutOptions(split_file=split_file))
    except SplitMismatchError as e:
        raise EvalInputError(str(e)) from None
    return filter_trees(held.held_out(trees), langs=list(OASST_EVAL_LANGS)).trees


LOADERS = {"fastchat": load_fastchat, "alpaca": load_alpaca, "hh": load_hh, "plain": load_plain,
           "oasst": load_oasst_eval}


def detect_format(path: Path) -> str:
    """The format from the file's content (see the module docstring)."""
    if str(path) == "fixture" or path.suffix == ".parquet" or path.name.endswith((".jsonl.gz", ".json.gz")) or path.is_dir():
        return "oasst"
    if path.suffix == ".json":
        return "alpaca"
    for _, row in iter_jsonl(path):
        if "turns" in row:
            return "fastchat"
        if "chosen" in row and "\n\nHuman:" in str(row["chosen"]):
            return "hh"
        if "message_tree_id" in row or "message_id" in row:
            return "oasst"
        return "plain"
    raise EvalInputError(f"{path}: the file is empty")


def load_source(name: str, path: str | Path, fmt: str | None = None) -> list[Prompt]:
    """All prompts of one source; `fmt` overrides detection (one of LOADERS)."""
    p = Path(path)
    if str(path) != "fixture" and not p.exists():
        raise EvalInputError(f"--source {name}={path}: no such file")
    fmt = fmt or detect_format(p)
    if fmt not in LOADERS:
        raise EvalInputError(f"unknown prompt format {fmt!r}; use one of {sorted(LOADERS)}")
    prompts = LOADERS[fmt](path if fmt == "oasst" else p, name)
    if not prompts:
        raise EvalInputError(f"--source {name}={path}: no prompts found ({fmt} format)")
    return prompts


def sample_splits(sources: dict[str, Sequence[Prompt]], splits: Sequence[tuple[str | None, int]], seed: int,
                  per_source: int | None = None, split_sources: dict[str, Sequence[str]] | None = None) -> list[Prompt]:
    """Deal `n` prompts per named split, round-robin over the sources (sorted by name) from
    per-source seeded shuffles: stratified, reproducible, and no prompt in two splits.

    Example: sources a (3 prompts) and b (1), splits [(x, 2), (y, 2)] -> x gets a, b; y gets
    a, a (b ran out, so the rest come from the sources that still have prompts).
    `per_source` caps how many prompts of each source take part at all. `split_sources` limits a
    named split to some sources (the thesis's tuning_eval: OASST only), e.g. {"tuning": ["oasst"]}."""
    pools = {}
    for name in sorted(sources):
        items = list(sources[name])
        random.Random(f"{seed}:{name}").shuffle(items)
        pools[name] = items[:per_source] if per_source is not None else items
    total = sum(len(v) for v in pools.values())
    wanted = sum(n for _, n in splits)
    if wanted > total:
        have = ", ".join(f"{k} {len(v)}" for k, v in pools.items())
        raise EvalInputError(f"the splits ask for {wanted} prompts but the sources hold {total} ({have}); "
                             "lower --per-source / --split counts or add sources")
    split_sources = split_sources or {}
    unknown = sorted({src for names in split_sources.values() for src in names} - set(pools))
    if unknown:
        raise EvalInputError(f"split_sources names sources that are not loaded: {unknown}; have {sorted(pools)}")
    out, order = [], list(pools)
    turn = 0
    for split, n in splits:
        allowed = [name for name in order if name in split_sources.get(split, order)]
        if sum(len(pools[name]) for name in allowed) < n:
            raise EvalInputError(f"split {split!r} asks for {n} prompts but its sources {allowed} have "
                                 f"{sum(len(pools[name]) for name in allowed)} left")
        for _ in range(n):
            while not pools[order[turn % len(order)]] or order[turn % len(order)] not in allowed:
                turn += 1
            p = pools[order[turn % len(order)]].pop(0)
            out.append(Prompt(p.id, p.source, p.messages, p.category, split))
            turn += 1
    return out


def parse_assignments(values: Iterable[str], what: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise EvalInputError(f"{what} expects NAME=VALUE, got {v!r}")
        out.append((name, rest))
    return out


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Read a prompts.jsonl written by `eval prompts` (or by hand), checking every row."""
    out, ids = [], set()
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        pid, source = row.get("id"), row.get("source", "default")
        if not isinstance(pid, (str, int)) or str(pid) == "":
            raise EvalInputError(f"{where}: every prompt needs an 'id' (string)")
        if str(pid) in ids:
            raise EvalInputError(f"{where}: duplicate id {pid!r}")
        ids.add(str(pid))
        messages = _check_messages(row.get("messages"), where)
        out.append(Prompt(str(pid), str(source), messages, row.get("category"), row.get("split")))
    if not out:
        raise EvalInputError(f"{path}: no prompts")
    return out


def instruction_text(messages: Sequence[dict[str, str]]) -> str:
    """AlpacaEval's `instruction` string: the user turn, or the dialogue as a transcript."""
    if len(messages) == 1:
        return messages[0]["content"]
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)
