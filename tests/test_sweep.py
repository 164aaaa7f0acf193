"""`crs-rlhf sweep`: grid parsing and naming (pure), and a tiny 2-weight × 3-step sweep on
services the sweep starts itself (real processes, one Ray cluster, two trainer processes)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from trainer.config_io import ConfigError
from crs_rlhf.sweep import final_means, main, parse_grid, run_label, run_name

ROOT = Path(__file__).resolve().parents[1]


def test_grid_is_the_cartesian_product_first_axis_slowest():
    grid = parse_grid(["crs.weight=0,0.25", "kl.init_coef=0.002,0.02"])
    assert grid == [
        {"crs.weight": 0, "kl.init_coef": 0.002}, {"crs.weight": 0, "kl.init_coef": 0.02},
        {"crs.weight": 0.25, "kl.init_coef": 0.002}, {"crs.weight": 0.25, "kl.init_coef": 0.02},
    ]
    assert parse_grid(["crs.abs_output=logit,probability"]) == [{"crs.abs_output": "logit"}, {"crs.abs_output": "probability"}]
    assert run_name(grid[3]) == "weight-0.25_init_coef-0.02"
    assert run_label(grid[3]) == "w=0.25, β0=0.02"


@pytest.mark.parametrize("specs,match", [
    (["crs.weight"], "must look like"), (["crs.weight="], "must look like"),
    (["crs.weight=0", "crs.weight=1"], "given twice"),
])
def test_bad_grids_say_how_to_fix_them(specs, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(specs)


def test_final_means_average_the_last_steps_and_keep_unused_signals_empty():
    rows = [{"step": i, "reward/pref": None, "reward/abs": float(i), "reward/crs": float(i), "kl/objective": 2.0 * i,
             "kl/coef": 0.1, "response_length/mean": 3.0} for i in range(1, 9)]
    m = final_means(rows, window=5)
    assert m["reward/abs"] == pytest.approx((4 + 5 + 6 + 7 + 8) / 5) and m["kl/objective"] == pytest.approx(12.0)
    assert m["reward/pref"] is None


def test_cli_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--grid", "crs.weight=0", "--start-services"]) == 2
    assert "--models" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--grid", "crs.weight=0", "--start-services", "--models", str(tmp_path)]) == 2
    assert "make-tiny-models" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--grid", "ppo.batch_size=10", "--set", "ppo.num_minibatches=4"]) == 2
    assert "multiple of" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_sweep_two_weights_three_steps_on_shared_services(tiny_models, tmp_path, capsys):
    out = tmp_path / "sweep"
    models = Path(tiny_models["policy"]).parent  # policy/, reward_pref/, reward_abs/
    argv = ["--config", str(ROOT / "configs" / "tiny" / "ppo.yaml"), "--grid", "crs.weight=0.25,1", "--out", str(out),
            "--start-services", "--models", str(models),
            "--set", "run.steps=3", "--set", "run.checkpoint_every=3", "--set", "ppo.batch_size=4",
            "--set", "ppo.num_minibatches=2", "--set", "generation.max_new_tokens=8", "--set", "ray.num_cpus=2"]
    assert main(argv) == 0, [(p, p.read_text()[-3000:]) for p in out.rglob("train.log")]
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["weight-0.25", "weight-1"]
    assert [float(r["crs.weight"]) for r in rows] == [0.25, 1.0]
    for r in rows:
        assert r["status"] == "done" and r["steps"] == "3"
        assert math.isfinite(float(r["final kl/objective"])) and float(r["final response_length/mean"]) > 0
        assert Path(r["final_adapter"], "adapter_model.safetensors").is_file()
        metrics = [json.loads(line) for line in Path(r["run_dir"], "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]
    assert rows[0]["final reward/abs"] != "" and rows[1]["final reward/abs"] == ""  # w = 1 never asks the abs RM
    for name in ("kl_objective.png", "reward.png", "response_length.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    # The same command again: every run is finished, nothing is started (no services, no Ray).
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 runs (2 finished before)" in capsys.readouterr().out
    with (out / "sweep.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["skipped", "skipped"]


def test_eval_hook_hands_the_final_adapters_to_eval_run(tmp_path):
    from trainer.ppo.config import PPOConfig
    from crs_rlhf.sweep import Run, eval_overrides

    runs = []
    for name, steps in (("weight-0", 3), ("weight-1", 0)):
        cfg = PPOConfig.model_validate({"run": {"output_dir": str(tmp_path / "runs" / name)}})
        cfg.run_dir.mkdir(parents=True)
        (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": k}) + "\n" for k in range(1, steps + 1)))
        runs.append(Run(name, {"crs.weight": 0}, cfg))
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text("out_dir: elsewhere\ngenerate:\n  policy_url: http://x\n  policies: [sft]\nrm_score: {}\n")
    sets = eval_overrides(str(eval_yaml), runs, tmp_path, {"policy_gen": "http://p", "reward_abs": "http://a"})
    policies = json.loads(next(s for s in sets if s.startswith("generate.policies=")).split("=", 1)[1])
    assert policies == ["sft", f"weight-0={tmp_path / 'runs' / 'weight-0' / 'adapters' / 'step-000003'}"]  # no steps: no policy
    assert f"out_dir={tmp_path / 'eval'}" in sets and "generate.policy_url=http://p" in sets
    assert "rm_score.abs_url=http://a" in sets and not any(s.startswith("rm_score.pref_url") for s in sets)
    # The overrides are valid for the evaluation's own config model.
    from trainer.config_io import load_config
    from evaluation.config import EvalConfig

    cfg = load_config(EvalConfig, eval_yaml, sets)
    assert cfg.generate.policies == policies and cfg.rm_score.abs_url == "http://a"
