"""PPOConfig: thesis defaults, strict validation, the tiny YAML, and the train CLI's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config_io import ConfigError, load_config
from trainer.ppo.config import PPOConfig

ROOT = Path(__file__).resolve().parents[1]


def test_thesis_defaults():
    c = PPOConfig()
    assert (c.optim.lr, c.optim.betas, c.optim.eps, c.optim.weight_decay) == (1.41e-5, (0.9, 0.95), 1e-8, 1e-6)
    assert (c.ppo.batch_size, c.ppo.ppo_epochs, c.ppo.clip_range, c.ppo.clip_range_value) == (16, 4, 0.4, 0.4)
    assert (c.ppo.gamma, c.ppo.lam) == (1.0, 0.95)
    assert (c.kl.init_coef, c.kl.adaptive) == (0.002, True)
    assert (c.generation.max_prompt_tokens, c.generation.max_new_tokens) == (1024, 512)
    assert (c.generation.top_k, c.generation.top_p, c.generation.temperature) == (0, 1.0, 1.0)
    assert (c.model.lora_r, c.model.lora_alpha, c.model.target_modules) == (16, 32, "all-linear")
    assert (c.crs.weight, c.crs.abs_output, c.crs.normalise, c.crs.score_clip) == (0.25, "logit", "none", 4.0)


def test_learner_defaults_are_the_single_fp32_learner_on_cpu():
    c = PPOConfig().learner
    assert (c.num_workers, c.precision, c.gradient_checkpointing, c.micro_batch_tokens) == (1, "auto", False, None)
    ok = load_config(PPOConfig, None, ["learner.num_workers=2", "ppo.mini_batch_size=2", "ppo.grad_accum=2"])
    assert ok.learner.num_workers == 2 and ok.mini_batch_size == 2


def test_tiny_yaml_loads_with_overrides():
    cfg = load_config(PPOConfig, ROOT / "configs" / "tiny" / "ppo.yaml",
                      ["crs.weight=1", "services.policy_url=http://127.0.0.1:1", "services.reward_pref_urls=[http://127.0.0.1:2]"])
    assert cfg.crs.weight == 1.0 and cfg.services.reward_pref_urls == ["http://127.0.0.1:2"]
    assert cfg.services.reward_abs_urls == []  # w = 1: the absolute service may be absent


@pytest.mark.parametrize("overrides,match", [
    (["ppo.batchsize=8"], "batchsize"),
    (["crs.weight=1.5"], "weight"),
    (["crs.normalise=zscore"], "normalise"),
    (["ppo.batch_size=10"], "multiple of ppo.num_minibatches"),
    (["services.policy_url=http://x", "services.reward_abs_urls=[http://y]"], "needs services.reward_pref_urls"),
    (["learner.num_workers=3"], r"num_workers 3 must divide the minibatch size 4 .*Use num_workers in \[1, 2, 4\]"),
    (["learner.num_workers=0"], "num_workers"),
    (["learner.precision=fp16"], "precision"),
    (["learner.micro_batch_tokens=0"], "micro_batch_tokens"),
])
def test_bad_configs_name_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PPOConfig, None, overrides)


def test_train_cli_rejects_bad_input(capsys):
    from trainer.ppo.cli import main

    assert main(["--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([]) == 2
    assert "services.policy_url" in capsys.readouterr().err


def test_learner_failures_have_their_own_exit_code():
    from trainer.ppo.cli import EXIT_LEARNER, EXIT_SERVICE, classify_failure
    from trainer.ppo.driver import StepFailed
    from trainer.ppo.learner_group import LearnerFailed

    msg = "learner worker rank 1 (node 10.0.0.2 / gpu-2, pid 7) died during train_step: ActorDiedError: x. Resume ..."
    assert classify_failure(LearnerFailed(msg)) == (EXIT_LEARNER, f"the learner failed: {msg}")
    assert EXIT_LEARNER == 4 and classify_failure(StepFailed("step 3: rollout failed"))[0] == EXIT_SERVICE


def test_plot_cli_on_a_missing_run(tmp_path, capsys):
    from crs_rlhf.plot import main

    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().out


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    from trainer.ppo.driver import PromptOrder

    order = PromptOrder(5, seed=3)
    first, second = [order(p) for p in range(5)], [order(p) for p in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5))  # each epoch sees every prompt once
    assert [PromptOrder(5, seed=3)(p) for p in range(10)] == first + second  # a resumed run agrees


def test_split_prompts_keeps_order_and_covers_all():
    from trainer.ppo.rollout import PromptItem, split_prompts

    items = [PromptItem(i, [{"role": "user", "content": str(i)}]) for i in range(7)]
    parts = split_prompts(items, 3)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert [it.index for p in parts for it in p] == list(range(7))
    assert len(split_prompts(items[:2], 4)) == 2  # no empty slices for idle workers


def test_run_dir_is_absolute_so_policy_gen_can_find_adapters(tmp_path, monkeypatch):
    # policy_gen is another process with its own cwd: a relative adapter path would 404 there.
    monkeypatch.chdir(tmp_path)
    cfg = PPOConfig.model_validate({"run": {"output_dir": "runs/rel"}})
    assert cfg.run_dir == tmp_path / "runs" / "rel"


THESIS = ROOT / "configs" / "thesis"


@pytest.mark.parametrize("w", ["0", "0.25", "0.625", "1"])
def test_thesis_ppo_presets_load_and_follow_table_8(w):
    cfg = load_config(PPOConfig, THESIS / f"ppo_w{w}.yaml")
    assert cfg.crs.weight == float(w) and cfg.run.output_dir == f"/data/runs/thesis/ppo_w{w}"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (1.41e-5, (0.9, 0.95), 1e-8, 1e-6)
    assert cfg.optim.max_grad_norm is None  # TRL 0.7 does not clip
    p = cfg.ppo
    assert (p.batch_size, p.mini_batch_size, p.grad_accum, p.ppo_epochs) == (16, 2, 8, 4)
    assert cfg.optimizer_steps_per_batch == 4  # one per epoch
    assert (p.clip_range, p.clip_range_value, p.gamma, p.lam) == (0.4, 0.4, 1.0, 0.95)
    # §5.4: 0.002 "for all the subsequent experiments"; Table 8 and Fig. 23's caption agree (0.02 is Fig. 20's run)
    assert (cfg.kl.init_coef, cfg.kl.adaptive) == (0.002, True)
    assert cfg.model.policy_path == "/data/runs/thesis/sft_full"  # the final runs' fully fine-tuned SFT
    assert (cfg.generation.max_prompt_tokens, cfg.generation.max_new_tokens, cfg.generation.top_k, cfg.generation.top_p) == (1024, 512, 0, 1.0)
    assert (cfg.crs.abs_output, cfg.crs.normalise, cfg.crs.score_clip) == ("logit", "none", 4.0)
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.target_modules) == (16, 32, "all-linear")


def test_thesis_ppo_presets_differ_only_in_the_weight():
    dumps = {}
    for path in sorted(THESIS.glob("ppo_w*.yaml")):
        data = load_config(PPOConfig, path).model_dump()
        data["crs"].pop("weight")
        data["run"].pop("output_dir")
        dumps[path.name] = data
    assert len(dumps) == 4 and all(d == dumps["ppo_w0.yaml"] for d in dumps.values())


def test_tiny_config_reads_the_tiny_models_under_runs():
    assert load_config(PPOConfig, ROOT / "configs" / "tiny" / "ppo.yaml").model.policy_path == "runs/tiny-models/policy"


@pytest.mark.parametrize("ppo,steps", [
    ({}, 16),  # ours: 4 minibatches of 4, 4 epochs
    ({"mini_batch_size": 2, "grad_accum": 8}, 4),
    ({"mini_batch_size": 4}, 16),
    ({"num_minibatches": 2, "grad_accum": 2}, 4),  # 2 minibatches of 8, both accumulated: 1 per epoch
])
def test_optimizer_steps_per_batch(ppo, steps):
    assert PPOConfig.model_validate({"ppo": ppo}).optimizer_steps_per_batch == steps


@pytest.mark.parametrize("overrides,match", [
    (["ppo.mini_batch_size=3"], "multiple of ppo.mini_batch_size × ppo.grad_accum"),
    (["ppo.mini_batch_size=2", "ppo.grad_accum=16"], "multiple of ppo.mini_batch_size × ppo.grad_accum"),
    (["ppo.mini_batch_size=2", "ppo.num_minibatches=4"], "not both"),
    (["run.keep_adapters=0"], "keep_adapters"),
])
def test_bad_schedules_name_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PPOConfig, None, overrides)


def test_wandb_is_optional_and_asking_without_it_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the offline test covers it")
    with pytest.raises(ConfigError, match=r"pip install 'crs-rlhf\[wandb\]'"):
        load_config(PPOConfig, None, ["run.report_to=[wandb]"])
    from trainer.ppo.metrics import require_wandb

    with pytest.raises(RuntimeError, match="not installed"):
        require_wandb()


def test_wandb_offline_logs_every_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from trainer.ppo.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = PPOConfig.model_validate({"run": {"output_dir": str(tmp_path / "run"), "report_to": ["wandb"], "tensorboard": False}})
    logger = MetricsLogger.for_run(cfg)
    for step in (1, 2):
        logger.log(step, {"reward/crs": 0.5 * step})
    logger.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_adapter_retention_keeps_newest_checkpoints_and_the_served_one(tmp_path):
    from trainer.ppo.driver import _prune_adapters

    cfg = PPOConfig.model_validate({"run": {"output_dir": str(tmp_path), "keep_adapters": 2}})
    for k in range(1, 8):
        (tmp_path / "adapters" / f"step-{k:06d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000003" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-000005.tmp").mkdir()  # half-written: not a checkpoint
    deleted = _prune_adapters(cfg, step=7)
    left = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert left == ["step-000003", "step-000006", "step-000007"]
    assert sorted(p.name for p in deleted) == ["step-000001", "step-000002", "step-000004", "step-000005"]
    none_cfg = PPOConfig.model_validate({"run": {"output_dir": str(tmp_path), "keep_adapters": None}})
    assert _prune_adapters(none_cfg, step=7) == [] and len(list((tmp_path / "adapters").iterdir())) == 3
    assert PPOConfig().run.keep_adapters == 3  # default: small (a 7B LoRA adapter is ~100 MB per step)
