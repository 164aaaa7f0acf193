"""Training sets from filtered OASST trees (pure functions over `MessageTree`s).

Conversations come out as OpenAI-style message lists ``[{"role": "user"|"assistant",
"content": str}]`` (OASST's "prompter" becomes "user"); turning them into text is the job
of `services.common.chat` alone, so training and serving see identical strings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from services.common.chat import format_prompt, normalise_role
from trainer.data.labels import resolve_weighting, weighted_target
from trainer.data.oasst import Message, MessageTree

Conversation = list[dict[str, str]]


@dataclass
class PreferenceSet:
    """A prompt (history ending in a user turn) and 2-4 replies, best first."""

    prompt: Conversation
    replies: list[str]
    tree_id: str = ""


@dataclass
class AbsoluteRow:
    """One assistant reply in its context, with its labels (name -> mean value)."""

    prompt: Conversation
    reply: str
    labels: dict[str, float]
    tree_id: str = ""
    target: float | None = None  # filled by `with_targets`


@dataclass
class LabelledRows:
    rows: list[AbsoluteRow]
    dropped: int = 0  # replies missing a needed label
    missing: dict[str, int] = field(default_factory=dict)  # label -> replies that lacked it


def _turn(m: Message) -> dict[str, str]:
    return {"role": normalise_role(m.role), "content": m.text}


def _paths(msg: Message, prefix: Conversation) -> Iterator[tuple[Conversation, Message]]:
    """(history before msg, msg) for every message in the subtree."""
    yield prefix, msg
    here = prefix + [_turn(msg)]
    for child in msg.replies:
        yield from _paths(child, here)


def _ranked(replies: Sequence[Message]) -> list[Message]:
    """Children best first: ranked ones by rank, unranked ones after, in export order."""
    order = {id(m): i for i, m in enumerate(replies)}
    return sorted(replies, key=lambda m: (m.rank is None, m.rank if m.rank is not None else 0, order[id(m)]))


def build_sft_threads(trees: Sequence[MessageTree]) -> list[Conversation]:
    """One thread per tree: root -> best-ranked reply at each turn, cut at the last assistant turn."""
    threads = []
    for tree in trees:
        thread, node = [], tree.root
        while True:
            thread.append(_turn(node))
            if not node.replies:
                break
            node = _ranked(node.replies)[0]
        while thread and thread[-1]["role"] != "assistant":
            thread.pop()
        if len(thread) >= 2:
            threads.append(thread)
    return threads


def build_preference_sets(
    trees: Sequence[MessageTree], *, min_replies: int = 2, max_replies: int = 4
) -> list[PreferenceSet]:
    """Every prompter message with >= `min_replies` RANKED assistant replies (top `max_replies`)."""
    sets = []
    for tree in trees:
        for history, msg in _paths(tree.root, []):
            if msg.role != "prompter":
                continue
            ranked = [m for m in _ranked(msg.replies) if m.role == "assistant" and m.rank is not None]
            if len(ranked) >= min_replies:
                prompt = history + [_turn(msg)]
                sets.append(PreferenceSet(prompt, [m.text for m in ranked[:max_replies]], tree.tree_id))
    return sets


def build_absolute_rows(trees: Sequence[MessageTree]) -> list[AbsoluteRow]:
    """Every assistant reply that carries at least one label (count > 0), with its history."""
    rows = []
    for tree in trees:
        for history, msg in _paths(tree.root, []):
            labels = {k: v.value for k, v in msg.labels.items() if v.count > 0}
            if msg.role == "assistant" and labels:
                rows.append(AbsoluteRow(history, msg.text, labels, tree.tree_id))
    return rows


def with_targets(rows: Sequence[AbsoluteRow], weighting: str | Mapping[str, float] = "quality") -> LabelledRows:
    """Set each row's target from `weighting`; rows missing a needed label are dropped and counted."""
    weights = resolve_weighting(weighting)
    out, missing = [], Counter()
    for row in rows:
        target = weighted_target(row.labels, weights)
        if target is None:
            missing.update(k for k, w in weights.items() if w != 0.0 and k not in row.labels)
            continue
        out.append(AbsoluteRow(row.prompt, row.reply, row.labels, row.tree_id, target))
    return LabelledRows(out, dropped=len(rows) - len(out), missing=dict(missing))


def build_rl_prompts(trees: Sequence[MessageTree], tokenizer=None, max_prompt_tokens: int = 1024) -> list[Conversation]:
    """Every history ending in a prompter message; with a tokenizer, those whose templated
    prompt (`format_prompt`, generation header included) exceeds `max_prompt_tokens` are dropped
    (the thesis drops prompts over 1024 tokens rather than cutting them)."""
    prompts = []
    for tree in trees:
        for history, msg in _paths(tree.root, []):
            if msg.role != "prompter":
                continue
            prompt = history + [_turn(msg)]
            if tokenizer is not None:
                n = len(tokenizer(format_prompt(prompt), add_special_tokens=True)["input_ids"])
                if n > max_prompt_tokens:
                    continue
            prompts.append(prompt)
    return prompts
