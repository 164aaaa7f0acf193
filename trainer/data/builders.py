"""Training sets from filtered OASST trees (pure functions over `MessageTree`s).

Conversations come out as OpenAI-style message lists ``[{"role": "user"|"assistant",
"content": str}]`` (OASST's "prompter" becomes "user"); turning them into text is the job
of `services.common.chat` alone, so training and serving see identical strings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.common.chat import format_prompt, normalise_role
from trainer.data.labels import SIX_LABELS, resolve_weighting, weighted_target
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
    group: str = ""  # message id of the prompter message the reply answers (its ranked set)
    rank: int | None = None


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


def _greedy_thread(tree: MessageTree) -> Conversation:
    thread, node = [], tree.root
    while True:
        thread.append(_turn(node))
        if not node.replies:
            return thread
        node = _ranked(node.replies)[0]


def _best_ranked_threads(msg: Message, prefix: list[Message]) -> Iterator[list[Message]]:
    """Root-to-leaf paths whose every message is best-ranked (rank 0) or unranked (None)."""
    if msg.rank is not None and msg.rank > 0:
        return
    here = prefix + [msg]
    kids = [c for c in msg.replies if c.rank is None or c.rank == 0]
    if not msg.replies or not kids:
        yield here
    for child in kids:
        yield from _best_ranked_threads(child, here)


def build_sft_threads(trees: Sequence[MessageTree], mode: str = "best_ranked") -> list[Conversation]:
    """SFT threads, each cut after its last assistant turn (threads with no assistant turn are skipped).

    ``best_ranked`` (Open Assistant's SFT definition, the thesis's): EVERY root-to-leaf thread
    along best-ranked or unranked messages, so a tree with two unranked replies, or a best reply
    with two follow-ups, gives several threads; a thread that only differs by a trailing prompter
    leaf is kept once. ``greedy``: one thread per tree, the best reply at each turn.
    """
    if mode not in ("best_ranked", "greedy"):
        raise ValueError(f"SFT thread mode must be 'best_ranked' or 'greedy', got {mode!r}")
    threads, seen = [], set()
    for tree in trees:
        paths = ([_greedy_thread(tree)] if mode == "greedy"
                 else [[_turn(m) for m in p] for p in _best_ranked_threads(tree.root, [])])
        for thread in paths:
            while thread and thread[-1]["role"] != "assistant":
                thread.pop()
            key = (tree.tree_id, len(thread), tuple(m["content"] for m in thread))
            if len(thread) >= 2 and key not in seen:
                seen.add(key)
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


def build_absolute_rows(
    trees: Sequence[MessageTree], source: str = "ranked", required: Sequence[str] | None = SIX_LABELS
) -> list[AbsoluteRow]:
    """Assistant replies with their history and labels (name -> mean value, labels with count > 0).

    ``source="ranked"`` (the thesis): the replies of the ranked sets (a prompter message with >= 2
    ranked assistant replies; every ranked reply, best first) with every label in `required`
    (default: the six the weightings use). ``source="labelled"``: every assistant reply with at
    least one label; pass ``required=None`` to leave the label check to `with_targets` (the
    weighting's own labels), which is how rows were chosen before.
    """
    if source not in ("ranked", "labelled"):
        raise ValueError(f"absolute rows source must be 'ranked' or 'labelled', got {source!r}")
    rows = []
    for tree in trees:
        for history, msg in _paths(tree.root, []):
            if source == "ranked":
                if msg.role != "prompter":
                    continue
                ranked = [m for m in _ranked(msg.replies) if m.role == "assistant" and m.rank is not None]
                here = history + [_turn(msg)]
                candidates = [(here, m) for m in ranked] if len(ranked) >= 2 else []
            else:
                candidates = [(history, msg)] if msg.role == "assistant" else []
            parent = msg.message_id if source == "ranked" else (msg.parent_id or "")
            for prompt, reply in candidates:
                labels = {k: v.value for k, v in reply.labels.items() if v.count > 0}
                if labels and all(k in labels for k in (required or ())):
                    rows.append(AbsoluteRow(prompt, reply.text, labels, tree.tree_id, group=parent, rank=reply.rank))
    return rows


def skip_close_to_best(rows: Sequence[AbsoluteRow], above: float = 0.6, gap: float = 0.05) -> list[AbsoluteRow]:
    """The thesis code's near-duplicate skip: within a ranked set (rows best first, targets set),
    a reply after the first whose target is >= `above` and within `gap` of the first's is dropped.

    Targets [0.9, 0.88, 0.7, 0.5] in one set keep 0.9, 0.7 (0.2 away) and 0.5 (below 0.6).
    """
    first: dict[str, float] = {}
    out = []
    for r in rows:
        if r.group not in first:
            first[r.group] = r.target
        elif r.target >= above and abs(first[r.group] - r.target) < gap:
            continue
        out.append(r)
    return out


def with_targets(rows: Sequence[AbsoluteRow], weighting: str | Mapping[str, float] = "quality") -> LabelledRows:
    """Set each row's target from `weighting`; rows missing a needed label are dropped and counted."""
    weights = resolve_weighting(weighting)
    out, missing = [], Counter()
    for row in rows:
        target = weighted_target(row.labels, weights)
        if target is None:
            missing.update(k for k, w in weights.items() if w != 0.0 and k not in row.labels)
            continue
        out.append(replace(row, target=target))
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
