"""No evaluation tree reaches any training set: SFT, both reward models and PPO leave out the
trees `crs-rlhf eval`'s OASST source draws from, and a split file that belongs to other data
(or another fraction/seed) is an error, not a silent re-split."""

from __future__ import annotations

import gzip
import shutil

import pytest

from evaluation.io import EvalInputError
from evaluation.prompts import load_oasst_eval
from trainer.data import build_preference_sets, fixture_path, load_oasst
from trainer.data.builders import build_absolute_rows
from trainer.data.rl import RLPromptOptions, build_rl_prompt_split
from trainer.data.splits import HeldOutOptions, SplitMismatchError, held_out_split, is_held_out
from trainer.rm.common import load_split
from trainer.rm.config import AbsoluteRMConfig, DataSection, PreferenceRMConfig
from trainer.sft.config import SFTConfig
from trainer.sft.train import sft_split


def _tree_of_prompt(trees):
    return {t.root.text: t.tree_id for t in trees}


def _ids(split):
    return {t.tree_id for t in split.train} | {t.tree_id for t in split.eval}


def _configs(data):
    return (SFTConfig(model={"base": "x"}, data=data),
            PreferenceRMConfig(model={"base": "x"}, data=data),
            AbsoluteRMConfig(model={"base": "x"}, data=data))


@pytest.mark.parametrize("fmt", ["trees", "messages"])
def test_no_evaluation_tree_reaches_any_training_set(fmt):
    path = fixture_path(fmt)
    trees = load_oasst(path)
    eval_prompts = load_oasst_eval(path, "oasst")
    assert len(eval_prompts) >= 3, "the fixture must hold some evaluation trees"
    by_text = _tree_of_prompt(trees)
    eval_trees = {by_text[p.messages[0]["content"]] for p in eval_prompts}
    assert all(len(p.messages) == 1 for p in eval_prompts)  # single-turn, the root message
    sft, pref, ab = _configs({"path": str(path), "langs": None})
    sft_trees = _ids(sft_split(sft)[0])  # train + SFT validation: neither may hold an eval tree
    pref_split, _ = load_split(pref.data)
    abs_split, _ = load_split(ab.data)
    assert sft_trees and not (sft_trees & eval_trees)
    for split in (pref_split, abs_split):
        assert not (_ids(split) & eval_trees)
        assert not {s.tree_id for s in build_preference_sets(split.train)} & eval_trees
        assert not {r.tree_id for r in build_absolute_rows(split.train)} & eval_trees
    rl = build_rl_prompt_split(trees, RLPromptOptions(langs=None, incomplete_trees=True), data=str(path))
    rl_trees = {by_text[p[0]["content"]] for p in rl.train}
    assert rl_trees and not (rl_trees & eval_trees)
    # Not vacuous: without the held-out split every stage would have trained on them.
    off = {"path": str(path), "langs": None, "held_out_fraction": 0.0}
    assert _ids(sft_split(_configs(off)[0])[0]) >= eval_trees
    assert _ids(load_split(DataSection(**off))[0]) >= eval_trees


def test_the_held_out_rule_ignores_filters_and_exports():
    trees = load_oasst(fixture_path())
    split = held_out_split(fixture_path(), trees)
    assert split.tree_ids == {t.tree_id for t in trees if is_held_out(t.tree_id, 0.1, 0)}
    # A subset of the trees (another export, other languages) holds out the same ones it has.
    part = trees[::2]
    assert {t.tree_id for t in part if is_held_out(t.tree_id, 0.1, 0)} == split.tree_ids & {t.tree_id for t in part}


def test_a_split_file_for_other_data_is_an_error(tmp_path):
    data = tmp_path / "export.trees.jsonl.gz"
    shutil.copy(fixture_path(), data)
    trees = load_oasst(data)
    first = held_out_split(data, trees)
    assert first.path == tmp_path / "export.trees.jsonl.gz.splits.json" and first.path.is_file()
    assert held_out_split(data, trees).tree_ids == first.tree_ids  # read back, same trees
    with pytest.raises(SplitMismatchError, match="held_out_fraction 0.2"):
        held_out_split(data, trees, HeldOutOptions(held_out_fraction=0.2))
    lines = gzip.decompress(data.read_bytes()).splitlines(keepends=True)
    data.write_bytes(gzip.compress(b"".join(lines[1:])))  # a re-export: one tree fewer, same file name
    with pytest.raises(SplitMismatchError, match="written for other data"):
        held_out_split(data, load_oasst(data))
    with pytest.raises(SplitMismatchError, match="written for other data"):
        load_split(DataSection(path=str(data)))
    with pytest.raises(EvalInputError, match="written for other data"):
        load_oasst_eval(data, "oasst")


def test_an_unwritable_split_file_says_what_to_set(tmp_path):
    data = tmp_path / "ro" / "export.trees.jsonl.gz"
    data.parent.mkdir()
    shutil.copy(fixture_path(), data)
    with pytest.raises(SplitMismatchError, match="split_file"):
        held_out_split(data, load_oasst(data), HeldOutOptions(split_file=str(tmp_path / "missing" / "s.json")))
    other = tmp_path / "splits.json"  # a writable place named explicitly
    assert held_out_split(data, load_oasst(data), HeldOutOptions(split_file=str(other))).path == other
