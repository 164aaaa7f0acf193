"""Tree filters and the train/eval split (pure functions; inputs are never mutated).

Open Assistant's own recipe keeps trees whose `tree_state` is ``ready_for_export``, drops
deleted and synthetic messages and those whose review was negative (``review_result`` false),
each with everything below it (a reply to a removed message has lost its context), and splits
by TREE, so no conversation prefix leaks from train into eval.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from trainer.data.oasst import Message, MessageTree

READY = "ready_for_export"
# Trees still being built or ranked: their prompter prefixes are usable RL prompts (the thesis
# says it used them). Not here: aborted_low_grade, halted_by_moderator, initial_prompt_review
# (rejected, stopped or not yet reviewed prompts).
INCOMPLETE = ("growing", "prompt_lottery_waiting", "ready_for_scoring", "backlog_ranking", "scoring_failed")


@dataclass
class FilterReport:
    """How many trees/messages each filter removed; used in 'empty data' errors."""

    trees_in: int = 0
    trees_out: int = 0
    trees_removed: dict[str, int] = field(default_factory=dict)  # filter -> trees
    messages_removed: dict[str, int] = field(default_factory=dict)  # filter -> messages (with subtrees)

    def describe(self) -> str:
        parts = [f"{self.trees_in} trees read"]
        parts += [f"{n} trees removed by {k}" for k, n in self.trees_removed.items() if n]
        parts += [f"{n} messages removed as {k} (with their replies)" for k, n in self.messages_removed.items() if n]
        return "; ".join(parts) + f"; {self.trees_out} trees left"


@dataclass
class Filtered:
    trees: list[MessageTree]
    report: FilterReport


@dataclass
class TreeSplit:
    train: list[MessageTree]
    eval: list[MessageTree]


def _prune(msg: Message, drops: tuple[bool, bool, bool], removed: Counter) -> Message | None:
    drop_deleted, drop_synthetic, drop_rejected = drops
    for flag, name in ((drop_deleted and msg.deleted, "deleted"), (drop_synthetic and msg.synthetic, "synthetic"),
                       (drop_rejected and msg.review_result is False, "review_result false")):
        if flag:
            removed[name] += sum(1 for _ in msg.walk())
            return None
    kids = [k for k in (_prune(c, drops, removed) for c in msg.replies) if k is not None]
    return replace(msg, replies=kids)


def filter_trees(
    trees: Sequence[MessageTree],
    *,
    tree_states: Sequence[str] | None = (READY,),
    drop_deleted: bool = True,
    drop_synthetic: bool = True,
    drop_rejected: bool = True,
    langs: Sequence[str] | None = None,
) -> Filtered:
    """Keep trees in `tree_states` (None = any) and `langs` (root language; None = any);
    `drop_rejected` removes messages whose ``review_result`` is false (None = not reviewed: kept)."""
    report = FilterReport(trees_in=len(trees))
    removed_trees: Counter = Counter()
    removed_msgs: Counter = Counter()
    out = []
    for tree in trees:
        if tree_states is not None and tree.tree_state not in tree_states:
            removed_trees["tree_state"] += 1
            continue
        if langs is not None and tree.lang not in langs:
            removed_trees["language"] += 1
            continue
        root = _prune(tree.root, (drop_deleted, drop_synthetic, drop_rejected), removed_msgs)
        if root is None:
            removed_trees["deleted/synthetic/rejected root"] += 1
            continue
        out.append(replace(tree, root=root))
    report.trees_removed = dict(removed_trees)
    report.messages_removed = dict(removed_msgs)
    report.trees_out = len(out)
    return Filtered(out, report)


def top_languages(trees: Sequence[MessageTree], n: int) -> list[str]:
    """The `n` most frequent root languages (ties broken by name, so the result is stable)."""
    counts = Counter(t.lang for t in trees)
    return [lang for lang, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def split_by_tree(
    trees: Sequence[MessageTree], eval_fraction: float, seed: int = 0, *, at_least_one: bool = True
) -> TreeSplit:
    """Seeded split of whole trees; with `at_least_one`, one eval tree at least when `eval_fraction`
    > 0 and n > 1 (otherwise exactly round(eval_fraction * n))."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    ids = sorted(t.tree_id for t in trees)
    random.Random(seed).shuffle(ids)
    n_eval = round(eval_fraction * len(ids))
    if at_least_one and eval_fraction > 0 and len(ids) > 1:
        n_eval = min(max(n_eval, 1), len(ids) - 1)
    eval_ids = set(ids[:n_eval])
    return TreeSplit([t for t in trees if t.tree_id not in eval_ids], [t for t in trees if t.tree_id in eval_ids])
