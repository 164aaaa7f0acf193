"""Thesis fidelity of the data: RL prompts, absolute-RM rows, SFT threads, the review filter.

Counts are read off the fixture's definition (trainer/data/fixtures/make_fixture.py): 39
trees pass the filters; pt/ru/it hold 5 of them (10 prompts); the two extra trees are
"en-unranked" (two rank-None replies) and "de-branching" (a best reply with two follow-ups
and a rejected third; a rejected sibling reply).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from trainer.data import (
    SIX_LABELS,
    RLPromptOptions,
    build_absolute_rows,
    build_preference_sets,
    build_rl_prompt_split,
    build_rl_prompts,
    build_sft_threads,
    filter_trees,
    fixture_path,
    load_oasst,
    with_targets,
)
from trainer.data.filters import INCOMPLETE
from trainer.data.rl import THESIS_HELD_OUT, held_out_tree_ids, sample_fraction
from trainer.data.splits import is_held_out
from trainer.rm.config import AbsoluteRMConfig


@pytest.fixture(scope="module")
def raw():
    return load_oasst(fixture_path("trees"))


@pytest.fixture(scope="module")
def trees(raw):
    return filter_trees(raw).trees


def _key(prompt) -> str:
    return json.dumps(prompt, ensure_ascii=False)


# --------------------------------------------------------------------------- 1. RL prompts


def test_rl_prompts_default_to_the_reward_models_languages(raw, trees):
    every = build_rl_prompts(trees)  # 77 over all seven languages
    split = build_rl_prompt_split(raw, RLPromptOptions(held_out_fraction=0.0))
    assert len(every) == 77 and len(split.train) == 77 - 10  # pt 2 trees x 2 + ru 2 x 2 + it 1 x 2
    assert set(split.per_language) == {"en", "es", "fr", "de"}
    assert sum(split.per_language.values()) == len(split.train) and split.held_out == []
    assert len(build_rl_prompt_split(raw, RLPromptOptions(langs=None, held_out_fraction=0.0)).train) == 77
    assert build_rl_prompt_split(raw, RLPromptOptions(langs=["pt"], held_out_fraction=0.0)).per_language == {"pt": 4}


def test_held_out_trees_never_give_a_training_prompt(raw):
    split = build_rl_prompt_split(raw, RLPromptOptions(held_out_fraction=0.3, split_seed=1))
    assert split.held_out and split.train
    assert not {_key(p) for p in split.train} & {_key(p) for p in split.held_out}
    by_tree = {t.tree_id: {_key(p) for p in build_rl_prompts([t])} for t in filter_trees(raw).trees}
    held = {k for tid in split.held_out_tree_ids for k in by_tree[tid]}
    assert held == {_key(p) for p in split.held_out}  # whole trees, every prefix of them
    assert len(split.train) + len(split.held_out) == 67
    # The decision is per tree: other languages, incomplete trees or a fraction never move a tree.
    for opts in (RLPromptOptions(held_out_fraction=0.3, split_seed=1, langs=None),
                 RLPromptOptions(held_out_fraction=0.3, split_seed=1, incomplete_trees=True),
                 RLPromptOptions(held_out_fraction=0.3, split_seed=1, fraction=0.1)):
        other = build_rl_prompt_split(raw, opts)
        assert set(split.held_out_tree_ids) <= set(other.held_out_tree_ids)
        assert not {_key(p) for p in other.train} & held
    assert held_out_tree_ids(raw, 0.0) == set()
    # The rule on the tree id alone (trainer.data.splits), whatever the tree's state or language.
    assert held_out_tree_ids(raw, 0.3, 1) == {t.tree_id for t in raw if is_held_out(t.tree_id, 0.3, 1)}


def test_held_out_prompts_are_the_evaluation_prompts(raw):
    # `crs-rlhf eval`'s oasst source and the RL split name the same trees: PPO never trains on them.
    from evaluation.prompts import load_oasst_eval

    split = build_rl_prompt_split(raw, RLPromptOptions(held_out_fraction=THESIS_HELD_OUT, langs=None))
    eval_prompts = load_oasst_eval("fixture", "oasst")
    # Eval takes one single-turn prompt (the root) per held-out tree; RL holds out every prefix.
    assert eval_prompts and {_key(p.messages) for p in eval_prompts} <= {_key(p) for p in split.held_out}
    assert not {_key(p.messages) for p in eval_prompts} & {_key(p) for p in split.train}


def test_fraction_of_the_training_prompts(raw):
    full = build_rl_prompt_split(raw, RLPromptOptions(held_out_fraction=0.0))
    for fraction, n in ((0.1, 7), (0.375, 25)):  # round(0.1 * 67), round(0.375 * 67)
        part = build_rl_prompt_split(raw, RLPromptOptions(fraction=fraction, held_out_fraction=0.0))
        assert len(part.train) == n and part.train_before_fraction == 67
        assert {_key(p) for p in part.train} <= {_key(p) for p in full.train}
    a = build_rl_prompt_split(raw, RLPromptOptions(fraction=0.375, fraction_seed=3)).train
    assert a == build_rl_prompt_split(raw, RLPromptOptions(fraction=0.375, fraction_seed=3)).train
    assert a != build_rl_prompt_split(raw, RLPromptOptions(fraction=0.375, fraction_seed=4)).train
    assert len(sample_fraction([1, 2, 3], 0.01)) == 1 and sample_fraction([1, 2, 3], 1.0) == [1, 2, 3]


def test_incomplete_trees_add_their_prefixes(raw):
    states = Counter(t.tree_state for t in raw)
    assert states["growing"] == 1 and states["prompt_lottery_waiting"] == 1 and states["aborted_low_grade"] == 1
    assert {"growing", "prompt_lottery_waiting"} <= set(INCOMPLETE) and "aborted_low_grade" not in INCOMPLETE
    base = build_rl_prompt_split(raw)
    more = build_rl_prompt_split(raw, RLPromptOptions(incomplete_trees=True))
    growing = [t for t in raw if t.tree_state in ("growing", "prompt_lottery_waiting")]
    extra = {_key(p) for p in build_rl_prompts(filter_trees(growing, tree_states=None).trees)}
    assert len(extra) == 4 and len(more.train) == len(base.train) + 4  # en growing + fr lottery, 2 prefixes each
    assert {_key(p) for p in more.train} - {_key(p) for p in base.train} == extra


def test_over_long_prompts_are_counted(raw, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    split = build_rl_prompt_split(raw, RLPromptOptions(held_out_fraction=0.0), tokenizer=tok, max_prompt_tokens=40)
    assert 0 < split.dropped_long < 67 and len(split.train) + split.dropped_long == 67


# --------------------------------------------------------------------------- 4. absolute rows


def test_absolute_rows_are_the_ranked_sets_replies_with_all_six_labels(trees):
    rows = build_absolute_rows(trees)  # the thesis's definition is the default
    sets = build_preference_sets(trees, max_replies=99)
    in_sets = {(_key(s.prompt), r) for s in sets for r in s.replies}
    assert all((_key(r.prompt), r.reply) in in_sets for r in rows)
    assert all(set(SIX_LABELS) <= set(r.labels) for r in rows)
    assert len(rows) == 119
    assert len(build_absolute_rows(trees, "ranked", required=None)) == 153  # ranked, any label
    old = build_absolute_rows(trees, "labelled", required=None)  # every labelled reply (before)
    assert len(old) == 165
    # The unranked tree's two labelled replies are absolute rows only in the old definition.
    egg = [r for r in old if r.prompt[-1]["content"] == "How long should I boil an egg?"]
    assert len(egg) == 2 and not [r for r in rows if r.prompt[-1]["content"] == "How long should I boil an egg?"]
    assert AbsoluteRMConfig(model={"base": "x"}).rows == "ranked"
    q = with_targets(rows)
    assert q.dropped == 0  # every row already has quality


# --------------------------------------------------------------------------- 8. SFT threads, review filter


def test_sft_takes_every_best_ranked_thread(trees):
    best, greedy = build_sft_threads(trees), build_sft_threads(trees, "greedy")
    assert (len(best), len(greedy)) == (41, 39)
    egg = [t for t in best if t[0]["content"] == "How long should I boil an egg?"]
    assert sorted(t[1]["content"][:5] for t in egg) == ["Seven", "Sure!"]  # both unranked replies
    lang = [t for t in best if t[0]["content"] == "Wie lerne ich am besten eine neue Sprache?"]
    assert sorted(t[2]["content"] for t in lang) == ["Und wie lange dauert das?", "Welche App empfiehlst du?"]
    assert all(len(t) == 4 for t in lang)
    # Never a reply ranked below the best: every assistant turn with a rank-1+ sibling is the best one.
    assert not any(m["content"].endswith("lol") for t in best for m in t if m["role"] == "assistant")
    with pytest.raises(ValueError, match="best_ranked"):
        build_sft_threads(trees, "all")


def test_review_result_false_removes_the_message_and_its_replies(raw, trees):
    texts = {m.text for t in trees for m in t.root.walk()}
    assert "Mit einer App." not in texts and "Kannst du mir einfach alles übersetzen?" not in texts
    assert "Nein." not in texts  # the reply under the rejected follow-up
    kept = {m.text for t in filter_trees(raw, drop_rejected=False).trees for m in t.root.walk()}
    assert {"Mit einer App.", "Kannst du mir einfach alles übersetzen?", "Nein."} <= kept
    assert len(build_sft_threads(filter_trees(raw, drop_rejected=False).trees)) == 42  # + the rejected follow-up's thread


def test_ppo_config_selects_the_prompts(tiny_models):
    from trainer.ppo.config import PPOConfig
    from trainer.ppo.driver import load_prompts

    base = {"model": {"policy_path": str(tiny_models["policy"])}}
    # en/es/fr/de, the held-out evaluation trees (5 trees, 10 prompts) apart, by default
    assert len(load_prompts(PPOConfig.model_validate(base)).prompts) == 67 - 10
    thesis = {**base, "run": {"prompts": {"held_out_fraction": 0.1, "fraction": 0.375, "incomplete_trees": True}}}
    got = load_prompts(PPOConfig.model_validate(thesis)).prompts
    raw = load_oasst(fixture_path())
    want = build_rl_prompt_split(raw, RLPromptOptions(held_out_fraction=0.1, fraction=0.375, incomplete_trees=True))
    assert got == want.train and len(got) == round(0.375 * want.train_before_fraction)
    # Another held-out share than the data's split file holds is refused, not silently re-split.
    other = {**base, "run": {"prompts": {"held_out_fraction": 0.05}}}
    with pytest.raises(ValueError, match="held_out_fraction 0.05"):
        load_prompts(PPOConfig.model_validate(other))


def test_near_duplicate_skip_of_the_thesis_code():
    from trainer.data.builders import AbsoluteRow, skip_close_to_best

    def row(group, target):
        return AbsoluteRow([], f"{group}{target}", {}, "t", target, group=group)

    rows = [row("a", 0.9), row("a", 0.88), row("a", 0.7), row("a", 0.5), row("b", 0.62), row("b", 0.6), row("b", 0.3)]
    kept = skip_close_to_best(rows)
    assert [(r.group, r.target) for r in kept] == [("a", 0.9), ("a", 0.7), ("a", 0.5), ("b", 0.62), ("b", 0.3)]
    assert AbsoluteRMConfig(model={"base": "x"}).skip_close_high is False


def test_absolute_rows_know_their_set(trees):
    rows = build_absolute_rows(trees)
    by_group: dict[str, list] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r.rank)
    assert all(ranks == sorted(ranks) for ranks in by_group.values())  # best first within each set
    assert all(r.group for r in rows) and len(by_group) <= len(build_preference_sets(trees)) == 57
    q = with_targets(rows).rows
    assert [r.group for r in q] == [r.group for r in rows]  # with_targets keeps set and rank
