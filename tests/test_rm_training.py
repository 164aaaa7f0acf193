"""Short real reward-model runs on the tiny models and the shipped fixture."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from services.common.chat import format_prompt, format_response
from trainer.data import (
    build_absolute_rows,
    build_preference_sets,
    filter_trees,
    fixture_path,
    load_oasst,
    with_targets,
)
from trainer.data.splits import held_out_split
from trainer.rm import AbsoluteRMConfig, PreferenceRMConfig, train_absolute_rm, train_preference_rm

TINY = {"max_tokens": 512, "min_prompt_tokens": 128}
PREF_KEYS = {"eval_pairwise_accuracy", "eval_loss", "eval_mean_margin", "train_pairwise_accuracy"}
ABS_KEYS = {"eval_loss", "mse_below_0.4", "mae_below_0.4", "mse_above_0.9", "mae_above_0.9", "mse_mid", "mae_mid"}


def _engine(path: Path):
    from services.reward.engine import EngineOptions, load_engine

    return load_engine(EngineOptions(model_path=str(path), max_tokens=512, min_prompt_tokens=128))


def _score(engine, prompt, replies) -> list[float]:
    rows = engine.encode_pairs([(format_prompt(prompt), format_response(r)) for r in replies])
    return engine.score_ids([r.ids for r in rows])


@pytest.fixture(scope="module")
def pref_run(tiny_models, tmp_path_factory) -> Path:
    cfg = PreferenceRMConfig(model={"base": str(tiny_models["policy"]), **TINY},
                             output_dir=str(tmp_path_factory.mktemp("pref")))
    return train_preference_rm(cfg)


@pytest.mark.slow
def test_preference_rm_learns_the_ranking(pref_run):
    m = json.loads((pref_run / "metrics.json").read_text())
    assert PREF_KEYS <= set(m)
    assert m["eval_loss"] < m["initial_eval_loss"]
    assert m["train_pairwise_accuracy"] >= 0.8  # chance is 0.5
    assert m["train_pairs"] > 50
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", "README.md"):
        assert (pref_run / name).exists(), name
    assert "pairwise accuracy" in (pref_run / "README.md").read_text()


@pytest.mark.slow
def test_preference_output_loads_in_the_scoring_engine(pref_run):
    engine = _engine(pref_run)
    trees = filter_trees(load_oasst(fixture_path()), langs=["en", "es", "fr", "de"]).trees
    sets = build_preference_sets(trees)
    right = sum(s[0] > s[-1] for s in (_score(engine, p.prompt, p.replies) for p in sets))
    assert right / len(sets) >= 0.8  # best reply above worst, scored by the service's own engine


@pytest.mark.slow
def test_adapter_output_and_resume(tiny_models, tmp_path):
    out = tmp_path / "adapter"
    base = {"model": {"base": str(tiny_models["policy"]), "merge": False, **TINY}, "output_dir": str(out)}
    train_preference_rm(PreferenceRMConfig(**base, train={"max_steps": 2}))
    first = json.loads((out / "metrics.json").read_text())["train_loss_history"]
    train_preference_rm(PreferenceRMConfig(**base, train={"max_steps": 4}))  # resumes from step 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and m["train_loss_history"][:2] == first
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == Path(tiny_models["policy"]).resolve()
    assert (out / "tokenizer_config.json").exists()
    scores = _score(_engine(out), [{"role": "user", "content": "Why is the sky blue?"}], ["Air scatters blue light.", "lol"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


@pytest.fixture(scope="module")
def abs_run(tiny_models, tmp_path_factory) -> Path:
    cfg = AbsoluteRMConfig(model={"base": str(tiny_models["reward_abs"]), **TINY},
                           remedies=["over_s", "under_s_10", "wgt_s_075"], train={"epochs": 4},
                           output_dir=str(tmp_path_factory.mktemp("abs")))
    return train_absolute_rm(cfg)


@pytest.mark.slow
def test_absolute_rm_learns_and_reports_per_range(abs_run):
    m = json.loads((abs_run / "metrics.json").read_text())
    assert ABS_KEYS <= set(m)
    assert m["eval_loss"] < m["initial_eval_loss"]
    assert m["train_ranges_after"]["low"] == 2 * m["train_ranges_before"]["low"]  # over_s
    assert m["train_ranges_after"]["mid"] <= 10  # under_s_10
    assert m["mae_below_0.4"] < 0.3 and m["mae_above_0.9"] < 0.3
    assert "| 0 - 0.40 |" in (abs_run / "metrics.md").read_text()  # the thesis range: 0.4 itself is low
    assert (abs_run / "predictions.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_absolute_output_scores_low_rated_replies_lower(abs_run):
    engine = _engine(abs_run)
    trees = filter_trees(load_oasst(fixture_path()), langs=["en", "es", "fr", "de"]).trees
    rows = with_targets(build_absolute_rows(trees)).rows
    low = [r for r in rows if r.target < 0.4][:10]
    high = [r for r in rows if r.target >= 0.9][:10]
    lo = sum(_score(engine, r.prompt, [r.reply])[0] for r in low) / len(low)
    hi = sum(_score(engine, r.prompt, [r.reply])[0] for r in high) / len(high)
    assert hi > lo + 1.0  # logits, not probabilities: the service returns the raw logit


@pytest.mark.slow
def test_other_absolute_losses_run(tiny_models, tmp_path):
    raw = load_oasst(fixture_path())
    held = held_out_split(fixture_path(), raw)  # the evaluation trees are no stage's training data
    trees = filter_trees(held.train(raw), langs=["en", "es", "fr", "de"]).trees
    w3 = with_targets(build_absolute_rows(trees, "labelled", required=None), "w3")
    assert w3.dropped > 0
    for kind in ("sigmoid_mse", "mse_penalty"):
        out = train_absolute_rm(AbsoluteRMConfig(model={"base": str(tiny_models["policy"]), "lora": False, **TINY},
                                                 loss={"kind": kind}, weighting="w3", rows="labelled", train={"max_steps": 8},
                                                 output_dir=str(tmp_path / kind)))
        m = json.loads((out / "metrics.json").read_text())
        assert m["eval_loss"] < m["initial_eval_loss"], kind
        assert m["train_rows"] + m["eval_rows"] == len(w3.rows)  # rows lacking helpfulness were dropped
        assert f"{w3.dropped} replies dropped for missing labels" in m["data"]


@pytest.mark.slow
def test_augment_paraphrases_with_in_process_generator(tiny_models):
    from trainer.rm.augment import AugmentSection, adjust_label, augment_rows

    rows = [r for r in with_targets(build_absolute_rows(filter_trees(load_oasst(fixture_path())).trees)).rows
            if r.target < 0.4][:3]
    res = augment_rows(rows, AugmentSection(max_new_tokens=8), base=str(tiny_models["policy"]), seed=0)
    assert len(res.rows) == 3
    for old, new, cos in zip(rows, res.rows, res.similarities):
        assert new.prompt == old.prompt and new.reply != old.reply
        assert new.target == pytest.approx(adjust_label(old.target, cos)) and new.target <= old.target


def test_cli_and_clear_errors(tiny_models, tmp_path, capsys, caplog):
    from crs_rlhf.cli import main

    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"model:\n  base: {tiny_models['policy']}\n  max_tokens: 256\n  min_prompt_tokens: 64\n")
    rc = main(["train-rm", "preference", "--config", str(cfg), "--output-dir", str(tmp_path / "o"),
               "--set", "train.max_steps=1"])
    assert rc == 0 and (tmp_path / "o" / "metrics.json").exists()
    assert main(["train-rm", "absolute", "--config", str(cfg), "--output-dir", str(tmp_path / "x"),
                 "--set", "weighting={qualty: 1.0}"]) == 2
    assert "unknown label name(s) ['qualty']" in capsys.readouterr().err
    assert main(["train-rm", "preference", "--config", str(cfg), "--output-dir", str(tmp_path / "y"),
                 "--set", "data.langs=[xx]"]) == 2
    err = capsys.readouterr().err
    assert "no trees left after filtering" in err and "35 trees removed by language" in err
    assert main(["train-rm", "preference", "--config", str(cfg), "--set", "train.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_base_without_pad_token_gets_one(tiny_models, tmp_path, caplog):
    from transformers import AutoTokenizer

    from trainer.modeling import load_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token == "<unk>" and fixed.pad_token != fixed.eos_token
    assert "has no pad token" in caplog.text
