"""PPO never trains on the prompts `crs-rlhf eval` (and the demo's held-out evaluation) uses."""

from __future__ import annotations

from trainer.data import fixture_path, load_oasst
from trainer.data.rl import THESIS_HELD_OUT, RLPromptOptions, build_rl_prompt_split
from evaluation.prompts import load_oasst_eval


def _key(messages):
    return tuple((m["role"], m["content"]) for m in messages)


def test_ppo_prompts_with_the_held_out_split_never_meet_the_eval_prompts():
    trees = load_oasst(fixture_path())
    eval_prompts = {_key(p.messages) for p in load_oasst_eval("fixture", "oasst")}
    assert eval_prompts, "the fixture must hold some eval trees"
    split = build_rl_prompt_split(trees, RLPromptOptions(held_out_fraction=THESIS_HELD_OUT, langs=None))
    train = {_key(p) for p in split.train}
    assert train and not (train & eval_prompts)
    # Without the held-out split, PPO would see them: the check above is not vacuous.
    everything = build_rl_prompt_split(trees, RLPromptOptions(held_out_fraction=0.0, langs=None))
    assert {_key(p) for p in everything.train} & eval_prompts
