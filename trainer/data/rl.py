"""RL prompts as the thesis drew them: languages, the held-out trees apart, a fraction, incomplete trees.

`build_rl_prompt_split(trees, RLPromptOptions(...), tokenizer, data=path)` takes the trees as
loaded (not yet filtered) because "incomplete trees" changes which tree states pass. The
held-out trees are those of the data's split file (trainer.data.splits): the trees SFT and
both reward models leave out too, and the only ones `crs-rlhf eval`'s ``oasst`` source draws
prompts from. Membership depends on the tree id alone, so languages, incomplete trees or a
fraction never move a tree across it, and eval prompts can never have been seen during PPO.
The fraction is taken from the training prompts after the split, so 10 % and 37.5 % runs
share one held-out set.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from trainer.config_base import Section
from trainer.data.builders import Conversation, build_rl_prompts
from trainer.data.filters import INCOMPLETE, READY, FilterReport, filter_trees
from trainer.data.oasst import MessageTree
from trainer.data.splits import HELD_OUT_FRACTION, HeldOutOptions, held_out_split, is_held_out

RM_LANGS = ["en", "es", "fr", "de"]
THESIS_HELD_OUT = HELD_OUT_FRACTION  # the share of trees every stage holds out for evaluation


class RLPromptOptions(Section):
    """Which OASST prompts PPO trains on (the PPO config's ``run.prompts``)."""

    langs: list[str] | None = Field(
        default_factory=lambda: list(RM_LANGS),
        description="root languages kept: the reward models' languages (thesis en, es, fr, de); null = all")
    held_out_fraction: float = Field(
        HELD_OUT_FRACTION, ge=0, lt=1, description="share of TREES kept out of PPO for evaluation: the data's "
        "split file's (every stage's; 0 = none, PPO then trains on the evaluation prompts)")
    split_seed: int = Field(0, description="seed of the held-out split (the split file's)")
    split_file: str | None = Field(None, description="the split file (default '<data>.splits.json' beside it)")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the training prompts used (thesis: 0.1, 0.375)")
    fraction_seed: int = Field(0, description="seed of the `fraction` sample")
    incomplete_trees: bool = Field(
        False, description="also take prefixes from trees still growing or being ranked (the thesis's text "
        "says it did: its presets set true); false = ready_for_export trees only")
    drop_rejected: bool = Field(True, description="drop messages whose review_result is false")


@dataclass
class RLPromptSplit:
    train: list[Conversation]  # what PPO samples from (after `fraction`)
    held_out: list[Conversation]  # prompts of the held-out trees: the OASST evaluation source
    held_out_tree_ids: list[str]
    dropped_long: int = 0  # train prompts over max_prompt_tokens (dropped, not cut)
    train_before_fraction: int = 0
    per_language: dict[str, int] = field(default_factory=dict)  # train prompts per root language
    report: FilterReport | None = None


def held_out_tree_ids(trees: Sequence[MessageTree], fraction: float, seed: int = 0) -> set[str]:
    """Ids of the held-out trees among `trees` (the split rule, no file)."""
    return {t.tree_id for t in trees if is_held_out(t.tree_id, fraction, seed)}


def sample_fraction(items: Sequence, fraction: float, seed: int = 0) -> list:
    """A seeded subset of round(fraction * n) items (at least one), in their original order."""
    if fraction >= 1.0 or not items:
        return list(items)
    k = max(1, round(fraction * len(items)))
    keep = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in keep]


def build_rl_prompt_split(
    trees: Sequence[MessageTree], opts: RLPromptOptions | None = None, tokenizer=None, max_prompt_tokens: int = 1024,
    data: str | None = None,
) -> RLPromptSplit:
    """Filter, hold out the evaluation trees, build prompts (over-long ones dropped with a
    tokenizer), take the fraction. `data`: the export the trees came from, whose split file is
    read (or written); None: the split rule alone."""
    opts = opts or RLPromptOptions()
    states = (READY, *INCOMPLETE) if opts.incomplete_trees else (READY,)
    filtered = filter_trees(trees, tree_states=states, langs=opts.langs, drop_rejected=opts.drop_rejected)
    if data is not None:
        held_ids = held_out_split(data, trees, HeldOutOptions(held_out_fraction=opts.held_out_fraction,
                                                              held_out_seed=opts.split_seed,
                                                              split_file=opts.split_file)).tree_ids
    else:
        held_ids = held_out_tree_ids(trees, opts.held_out_fraction, opts.split_seed)
    held = [t.tree_id in held_ids for t in filtered.trees]
    train_trees = [t for t, h in zip(filtered.trees, held) if not h]
    eval_trees = [t for t, h in zip(filtered.trees, held) if h]
    per_tree = []  # (lang, prompt) in tree order, so per-language counts follow the fraction
    for tree in train_trees:
        per_tree += [(tree.lang, p) for p in build_rl_prompts([tree], tokenizer, max_prompt_tokens)]
    total = sum(len(build_rl_prompts([t])) for t in train_trees) if tokenizer is not None else len(per_tree)
    chosen = sample_fraction(per_tree, opts.fraction, opts.fraction_seed)
    return RLPromptSplit(
        train=[p for _, p in chosen], held_out=build_rl_prompts(eval_trees),
        held_out_tree_ids=[t.tree_id for t in eval_trees], dropped_long=total - len(per_tree),
        train_before_fraction=len(per_tree), per_language=dict(Counter(lang for lang, _ in chosen)),
        report=filtered.report)
