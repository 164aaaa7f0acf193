"""The demo's learning measure (crs_rlhf/learning.py) on hand-worked numbers, and `--reuse`'s
check that a model folder was trained with exactly the config the demo would use."""

from __future__ import annotations

import math

import pytest

from crs_rlhf.demo import finished_with, parse_args
from crs_rlhf.learning import describe, reward_gain, sample_stats
from trainer.config_io import dump_config
from trainer.sft import SFTConfig


def test_sample_stats_hand_worked():
    assert sample_stats([1.0, 3.0]) == (2.0, 2.0)
    assert sample_stats([0.0, 0.0, 3.0]) == (1.0, 3.0)  # deviations -1, -1, 2: (1 + 1 + 4) / 2
    with pytest.raises(ValueError, match="at least two"):
        sample_stats([1.0])


def test_reward_gain_hand_worked_within_noise():
    # differences a: [1, 0] (mean 0.5, var 0.5), b: [1, 0] (mean 0.5, var 0.5)
    m = reward_gain({"a": [1.0, 3.0], "b": [2.0, 2.0]}, {"a": [0.0, 3.0], "b": [1.0, 2.0]})
    assert m["crs_gain"] == pytest.approx(0.5)
    assert m["se"] == pytest.approx(math.sqrt(0.125))  # (0.5/2 + 0.5/2) / 2²
    assert m["se_unpaired"] == pytest.approx(math.sqrt(0.875))  # (2/2 + 4.5/2 + 0/2 + 0.5/2) / 2²
    assert m["z"] == pytest.approx(0.5 / math.sqrt(0.125))
    assert (m["crs_before"], m["crs_after"]) == (pytest.approx(1.5), pytest.approx(2.0))
    assert m["prompts"] == 2 and m["prompts_improved"] == 2 and m["samples_per_prompt"] == 2
    assert not m["beyond_noise"]
    assert "within noise" in describe(m)


def test_reward_gain_beyond_noise_both_ways():
    up = reward_gain({"a": [1.0, 1.2], "b": [0.9, 1.1]}, {"a": [0.0, 0.2], "b": [0.1, -0.1]})
    assert up["crs_gain"] == pytest.approx(1.0)  # differences a [1, 1], b [0.8, 1.2]
    assert up["se"] == pytest.approx(math.sqrt(0.08 / 2) / 2)  # only b's differences vary (var 0.08)
    assert up["beyond_noise"] and "raised" in describe(up)
    down = reward_gain({"a": [0.0, 0.2], "b": [0.1, -0.1]}, {"a": [1.0, 1.2], "b": [0.9, 1.1]})
    assert down["crs_gain"] == pytest.approx(-1.0) and down["beyond_noise"]
    assert "LOWERED" in describe(down)


def test_pairing_is_what_resolves_a_gain_the_unpaired_se_cannot():
    # Samples spread widely (the seed decides most of the reward) but each pair moves by +0.1:
    # unpaired the spread hides the gain, paired it is plain.
    before = {"a": [0.0, 1.0, 2.0, 3.0], "b": [3.0, 0.0, 1.0, 2.0]}
    after = {p: [x + 0.1 + 0.01 * j for j, x in enumerate(xs)] for p, xs in before.items()}
    m = reward_gain(after, before)
    assert m["crs_gain"] == pytest.approx(0.115)
    assert m["se_unpaired"] > 0.5 and m["se"] < 0.01 and m["beyond_noise"]
    # Shuffling one side's samples breaks the pairs: the same means, no longer resolved.
    shuffled = {p: xs[1:] + xs[:1] for p, xs in after.items()}
    assert not reward_gain(shuffled, before)["beyond_noise"]


def test_reward_gain_refuses_mismatched_prompts():
    with pytest.raises(ValueError, match="same"):
        reward_gain({"a": [1.0, 2.0]}, {"b": [1.0, 2.0]})
    with pytest.raises(ValueError, match="same"):
        reward_gain({}, {})
    with pytest.raises(ValueError, match="pairs"):
        reward_gain({"a": [1.0, 2.0, 3.0]}, {"a": [1.0, 2.0]})


def _finished(folder, cfg) -> None:
    folder.mkdir(parents=True)
    dump_config(cfg, folder / "config.yaml")
    (folder / "README.md").write_text("card")  # the trainers write it last


def test_finished_with_needs_the_same_config_and_a_finished_folder(tmp_path):
    cfg = SFTConfig.model_validate({"output_dir": str(tmp_path / "sft"), "model": {"base": "some/base"},
                                    "train": {"lr": 2e-4, "seed": 0}})
    assert not finished_with(tmp_path / "sft", cfg)  # nothing there
    _finished(tmp_path / "sft", cfg)
    assert finished_with(tmp_path / "sft", cfg)
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-4})})
    assert not finished_with(tmp_path / "sft", other)  # trained with another learning rate
    (tmp_path / "sft" / "README.md").unlink()
    assert not finished_with(tmp_path / "sft", cfg)  # died before the end
    (tmp_path / "sft" / "README.md").write_text("card")
    (tmp_path / "sft" / "config.yaml").write_text("train: [not, a, section]\n")
    assert not finished_with(tmp_path / "sft", cfg)  # unreadable: trained again, not an error


def test_reuse_flag_parses():
    assert parse_args(["--reuse"]).reuse and not parse_args([]).reuse


def test_a_failing_reward_model_child_is_reported_with_its_log(tmp_path):
    from crs_rlhf.demo import start_rm_child, wait_rm_child
    from trainer.rm import AbsoluteRMConfig

    cfg = AbsoluteRMConfig.model_validate({"output_dir": str(tmp_path / "rm_absolute"),
                                           "model": {"base": str(tmp_path / "no-such-model")}})
    child = start_rm_child(cfg, "absolute", tmp_path)
    with pytest.raises(SystemExit, match="reward model training failed") as e:
        wait_rm_child(child)
    assert "no-such-model" in str(e.value)  # the child's own error, from its log
    assert (tmp_path / "rm_absolute.config.yaml").is_file()
