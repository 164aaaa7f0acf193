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
# One preset per row of the thesis's Tables 6 and 7 (its method column: loss + remedies; every
# row uses the quality label), plus the w2 / w3 weightings of §4 and the plain quality baseline.
# Table 6 row 1 is Table 7's over_s + wgt_s_075, Table 6 row 4 is Table 7 row 4: one file each.
TABLE_ROWS = {
    "logistic_over_s_wgt_s_075": ("logistic", ["over_s", "wgt_s_075"], "quality"),  # T6 r1, T7 r7
    "mse_penalty_over_s_wgt_s_075": ("mse_penalty", ["over_s", "wgt_s_075"], "quality"),  # T6 r2 "mse"
    "sigmoid_mse_over_s_under_s_8k_wgt_s_075": ("sigmoid_mse", ["over_s", "under_s_8k", "wgt_s_075"], "quality"),  # T6 r3
    "logistic_over_s_under_s_8k_wgt_s_075": ("logistic", ["over_s", "under_s_8k", "wgt_s_075"], "quality"),  # T6 r4, T7 r4
    "logistic_augment_under_s_8k": ("logistic", ["augment", "under_s_8k"], "quality"),  # T6 r5
    "sigmoid_mse_augment_under_s_8k": ("sigmoid_mse", ["augment", "under_s_8k"], "quality"),  # T6 r6
    "sigmoid_mse_augment_over_s_under_s_16k_wgt_1_4": ("sigmoid_mse", ["augment", "over_s", "under_s_16k", "wgt_1_4"],
                                                       "quality"),  # T6 r7
    "logistic_augment_over_s_under_s_16k_wgt_1_4": ("logistic", ["augment", "over_s", "under_s_16k", "wgt_1_4"],
                                                    "quality"),  # T6 r8
    "logistic_augment_under_s_8k_wgt_s_05": ("logistic", ["augment", "under_s_8k", "wgt_s_05"], "quality"),  # T7 r1
    "logistic_augment_under_s_8k_wgt_s_075": ("logistic", ["augment", "under_s_8k", "wgt_s_075"], "quality"),  # T7 r2
    "logistic_over_s_under_s_8k_wgt_s_05": ("logistic", ["over_s", "under_s_8k", "wgt_s_05"], "quality"),  # T7 r3
    "logistic_over_s_under_s_8k": ("logistic", ["over_s", "under_s_8k"], "quality"),  # T7 r5
    "logistic_over_s_wgt_s_05": ("logistic", ["over_s", "wgt_s_05"], "quality"),  # T7 r6
    "logistic_over_s": ("logistic", ["over_s"], "quality"),  # T7 r8
    "w2": ("logistic", [], "w2"),
    "w3": ("logistic", [], "w3"),
    "quality": ("logistic", [], "quality"),
}


def test_every_table_row_is_a_preset():
    assert {p.stem.removeprefix("rm_abs_") for p in ABS} == set(TABLE_ROWS)
    for path in ABS:
        cfg = load_config(AbsoluteRMConfig, path)
        assert (cfg.loss.kind, cfg.remedies, cfg.weighting) == TABLE_ROWS[path.stem.removeprefix("rm_abs_")], path.stem


def test_table_6_names_that_are_not_remedies_are_errors():
    # Table 6 prints "wgt_s_75" for 0.75: an error naming the accepted forms, never a weight of 75
    with pytest.raises(ValueError, match="wgt_s_075"):
        parse_remedies(["over_s", "wgt_s_75"])
    assert parse_remedies(["wgt_s_075"]).wgt_s == 0.75 and parse_remedies(["wgt_s_0.5"]).wgt_s == 0.5


def test_sft_preset_is_table_3():
    cfg = load_config(SFTConfig, THESIS / "sft.yaml")
    t, m = cfg.train, cfg.model
    assert (t.lr, t.batch_size, t.grad_accum, t.warmup_ratio, t.max_grad_norm) == (1e-4, 4, 16, 0.03, 0.3)
    assert (t.epochs, cfg.pre_sft.epochs, cfg.data.eval_fraction) == (2, 1, 0.05)  # §5.1: two epochs; 95 / 5
    assert (t.adam_betas, t.adam_eps) == ((0.9, 0.999), 1e-12)
    assert (m.lora, m.lora_r, m.lora_alpha, m.max_tokens) == (True, 16, 32, 2048)
    assert cfg.data.threads == "best_ranked" and cfg.data.top_languages == 20 and cfg.data.drop_rejected
    assert [Path(p).name for p in cfg.pre_sft.paths] == ["alpaca_data.json", "databricks-dolly-15k.jsonl", "train.jsonl"]
    assert cfg.data.path.endswith(".trees.jsonl.gz") and "llama" in m.base.lower()


def test_full_sft_preset_is_the_final_runs_base():
    cfg = load_config(SFTConfig, THESIS / "sft_full.yaml")
    t, m = cfg.train, cfg.model
    assert m.lora is False and t.epochs == 3  # Köpf et al.'s model: full fine-tuning, three epochs (§5.2)
    assert (t.precision, t.gradient_checkpointing, t.optimizer) == ("bf16", True, "adamw_8bit")
    assert t.batch_size * t.grad_accum == 4 * 16  # Table 3's threads per optimizer step
    assert cfg.output_dir == "/data/runs/thesis/sft_full"


@pytest.mark.parametrize("kind,path", RM_PRESETS, ids=[p.stem for _, p in RM_PRESETS])
def test_rm_presets_are_table_5(kind, path):
    cfg = load_config(PreferenceRMConfig if kind == "preference" else AbsoluteRMConfig, path)
    t, m = cfg.train, cfg.model
    assert (t.lr, t.epochs, t.grad_accum, t.warmup_ratio, t.max_grad_norm, t.adam_betas) == (
        5e-5, 1, 16, 0.03, 0.3, (0.9, 0.95))
    assert t.batch_size * t.grad_accum == (32 if kind == "preference" else 128)
    assert (m.lora, m.lora_r, m.lora_alpha, m.max_tokens, m.min_prompt_tokens) == (True, 16, 32, 2048, 256)
    assert cfg.data.langs == ["en", "es", "fr", "de"] and cfg.data.path.endswith(".trees.jsonl.gz")
    assert m.base == "/data/runs/thesis/sft_full"  # both RMs start from the fully fine-tuned SFT model
    if kind == "absolute":
        assert cfg.rows == "ranked"
        name = path.stem.removeprefix("rm_abs_")
        rem = parse_remedies(cfg.remedies)  # every name parses
        assert (cfg.loss.kind, cfg.remedies, cfg.weighting) == TABLE_ROWS[name]
        if cfg.loss.kind == "mse_penalty":
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
