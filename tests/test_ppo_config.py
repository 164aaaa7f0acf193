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


def test_plot_cli_on_a_missing_run(tmp_path, capsys):
    from trainer.plot import main

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
