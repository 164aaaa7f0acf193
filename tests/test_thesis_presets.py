"""The thesis presets (configs/thesis/): every file validates with the thesis's numbers, and each
reward-model preset runs end to end on the tiny models and the fixture with `--set` size overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.config_io import load_config
from trainer.rm.config import AbsoluteRMConfig, PreferenceRMConfig
from trainer.rm.sampling import parse_remedies
from trainer.sft.config import SFTConfig

THESIS = Path(__file__).resolve().parents[1] / "configs" / "thesis"
ABS = sorted(THESIS.glob("rm_abs_*.yaml"))
RM_PRESETS = [("preference", THESIS / "rm_preference.yaml")] + [("absolute", p) for p in ABS]
TABLE_6_7 = {"quality", "w2", "w3", "sigmoid_mse", "mse_penalty", "over_s_8k", "wgt_1_4", "under_s_8k",
             "under_s_16k", "wgt_s_05", "wgt_s_075", "augment_under_s_8k_wgt_s_075"}


def test_every_absolute_variant_is_there():
    assert {p.stem.removeprefix("rm_abs_") for p in ABS} == TABLE_6_7


def test_sft_preset_is_table_3():
    cfg = load_config(SFTConfig, THESIS / "sft.yaml")
    t, m = cfg.train, cfg.model
    assert (t.lr, t.batch_size, t.grad_accum, t.warmup_ratio, t.max_grad_norm) == (1e-4, 4, 16, 0.03, 0.3)
    assert (t.adam_betas, t.adam_eps) == ((0.9, 0.999), 1e-12)
    assert (m.lora, m.lora_r, m.lora_alpha, m.max_tokens) == (True, 16, 32, 2048)
    assert cfg.data.threads == "best_ranked" and cfg.data.top_languages == 20 and cfg.data.drop_rejected
    assert [Path(p).name for p in cfg.pre_sft.paths] == ["alpaca_data.json", "databricks-dolly-15k.jsonl", "train.jsonl"]
    assert cfg.data.path.endswith(".trees.jsonl.gz") and "llama" in m.base.lower()


@pytest.mark.parametrize("kind,path", RM_PRESETS, ids=[p.stem for _, p in RM_PRESETS])
def test_rm_presets_are_table_5(kind, path):
    cfg = load_config(PreferenceRMConfig if kind == "preference" else AbsoluteRMConfig, path)
    t, m = cfg.train, cfg.model
    assert (t.lr, t.epochs, t.grad_accum, t.warmup_ratio, t.max_grad_norm, t.adam_betas) == (
        5e-5, 1, 16, 0.03, 0.3, (0.9, 0.95))
    assert t.batch_size * t.grad_accum == (32 if kind == "preference" else 128)
    assert (m.lora, m.lora_r, m.lora_alpha, m.max_tokens, m.min_prompt_tokens) == (True, 16, 32, 2048, 256)
    assert cfg.data.langs == ["en", "es", "fr", "de"] and cfg.data.path.endswith(".trees.jsonl.gz")
    assert m.base == "/data/runs/thesis/sft"  # both RMs start from the SFT model
    if kind == "absolute":
        assert cfg.rows == "ranked"
        name = path.stem.removeprefix("rm_abs_")
        rem = parse_remedies(cfg.remedies)  # every name parses
        expected = {"w2": "w2", "w3": "w3"}.get(name, "quality")
        assert cfg.weighting == expected
        assert cfg.loss.kind == (name if name in ("sigmoid_mse", "mse_penalty") else "logistic")
        if name == "mse_penalty":
            assert (cfg.loss.penalty, cfg.loss.penalty_form) == (0.02, "linear")
        if rem.augment:
            assert cfg.augment.max_new_tokens == 512 and cfg.augment.mismatch_similarity == 0.2


@pytest.mark.slow
@pytest.mark.parametrize("kind,path", RM_PRESETS, ids=[p.stem for _, p in RM_PRESETS])
def test_rm_preset_runs_on_tiny_models(kind, path, tiny_models, tmp_path):
    from crs_rlhf.cli import main

    base = str(tiny_models["policy"])
    size = [f"model.base={base}", "model.max_tokens=256", "model.min_prompt_tokens=64", "data.path=null",
            "train.max_steps=1", "train.grad_accum=1", "train.batch_size=4", "train.cpu_threads=1"]
    if "augment" in yaml.safe_load(path.read_text()).get("remedies", []):
        size += [f"augment.generator_path={base}", "augment.encoder=null", "augment.max_new_tokens=4",
                 "augment.max_rows=2"]
    if path.stem == "rm_abs_quality":
        size.append("skip_close_high=true")  # the thesis code's near-duplicate skip, as an option
    out = tmp_path / path.stem
    rc = main(["train-rm", kind, "--config", str(path), "--output-dir", str(out)] + [a for s in size for a in ("--set", s)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 1 and (out / "config.json").exists()
    if kind == "absolute":
        assert m["remedies"] == parse_remedies(yaml.safe_load(path.read_text())["remedies"]).names()
        if "augment" in m["remedies"]:
            assert m["augmented_rows"] == 2
        assert ("near-duplicate high replies skipped" in m["data"]) == (path.stem == "rm_abs_quality")


@pytest.mark.slow
def test_sft_preset_runs_on_tiny_models(tiny_models, tmp_path):
    from crs_rlhf.cli import main

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}] * 4))
    size = [f"model.base={tiny_models['policy']}", "model.lora=false", "model.max_tokens=256", "data.path=null",
            f"pre_sft.paths=[{alpaca}]", "pre_sft.max_steps=1", "train.max_steps=1", "train.grad_accum=1",
            "train.cpu_threads=1"]
    out = tmp_path / "sft"
    assert main(["train-sft", "--config", str(THESIS / "sft.yaml"), "--output-dir", str(out)]
                + [a for s in size for a in ("--set", s)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["pre_sft_steps"], m["steps"]) == (1, 1)
