"""Several trainers on ONE policy_gen with its default settings (max_loras 2).

Before the fix, each sync loaded the new adapter before unloading the old one, so two
trainers needed three slots and both died on the 400 `2 adapters are loaded, the server's
max_loras`. Now a trainer holds one slot (unload, then load), waits out a full table, and
frees its slot when it ends.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from _support import make_adapter, running, service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tiny_models, reward_abs_url, tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("multi")
    runs = root / "runs"
    runs.mkdir()
    # policy_gen exactly as a user starts it: no --max-loras. The trainers only score with reward_abs: the session's.
    policy = service("services.policy_gen", "--backend", "hf", "--model-path", str(tiny_models["policy"]),
                     "--adapter-root", str(runs), log_dir=root, name="policy")
    with running({"policy": policy}):  # both learners (1 CPU each) in the session's Ray cluster
        yield {"runs": runs, "policy": tiny_models["policy"], "urls": {"policy": policy.url, "abs": reward_abs_url}}


def _cfg(shared, run: str, **run_over):
    from trainer.ppo.config import PPOConfig

    return PPOConfig.model_validate({
        "model": {"policy_path": str(shared["policy"])},
        "optim": {"lr": 1e-3},
        "ppo": {"batch_size": 4, "num_minibatches": 2, "ppo_epochs": 1},
        "generation": {"max_new_tokens": 8, "max_prompt_tokens": 256},
        "crs": {"weight": 0.0},
        "services": {"policy_url": shared["urls"]["policy"], "reward_abs_urls": [shared["urls"]["abs"]], "timeout_s": 60},
        "run": {"output_dir": str(shared["runs"] / run), "steps": 4, "checkpoint_every": 4, "tensorboard": False, **run_over},
    })


def _models(shared) -> list[str]:
    from trainer.clients.policy import PolicyClient

    async def go():
        async with PolicyClient(shared["urls"]["policy"], model="") as c:
            return await c.models()

    return asyncio.run(go())


def test_two_trainers_share_one_default_policy_gen(shared):
    from trainer.ppo.driver import train

    cfgs = [_cfg(shared, "w0-a", seed=0), _cfg(shared, "w0-b", seed=1)]
    results, errors = {}, {}

    def run(cfg):
        try:
            results[cfg.run.output_dir] = train(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors[cfg.run.output_dir] = e

    threads = [threading.Thread(target=run, args=(c,)) for c in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    for cfg in cfgs:
        assert results[cfg.run.output_dir].last_step == 4
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        kept = sorted(p.name for p in (cfg.run_dir / "adapters").iterdir())
        assert kept == ["step-000002", "step-000003", "step-000004"]  # keep_adapters 3 (step 4 is also the checkpoint)
    assert _models(shared)[1:] == []  # both runs gave their slot back when they ended


def test_a_full_adapter_table_is_waited_out_then_named(shared, caplog):
    from trainer.clients.policy import AdapterTableFull, PolicyClient
    from trainer.ppo.deadline import StepDeadline
    from trainer.ppo.policy_sync import sync_adapter

    cfg = _cfg(shared, "slots", step_timeout_s=60)
    # Its own adapters (any LoRA will do: only the table's slots are counted), so it runs in any order.
    adapters = [str(make_adapter(shared["policy"], shared["runs"] / "slots-adapters" / f"a{i}", seed=i)) for i in range(3)]

    async def call(method, *args):
        async with PolicyClient(shared["urls"]["policy"], model="") as c:
            return await getattr(c, method)(*args)

    asyncio.run(call("load_adapter", adapters[0], "other-trainer-1"))
    asyncio.run(call("load_adapter", adapters[1], "other-trainer-2"))  # the table (2) is full
    releaser = threading.Timer(2.0, lambda: asyncio.run(call("unload_adapter", "other-trainer-1")))
    releaser.start()
    with caplog.at_level("WARNING", logger="crs_rlhf.ppo"):
        sync_adapter(cfg, adapters[2], "waiting-trainer", None)  # blocks until the slot frees
    releaser.join()
    assert "adapter table is full" in caplog.text
    assert sorted(_models(shared)[1:]) == ["other-trainer-2", "waiting-trainer"]

    with pytest.raises(AdapterTableFull, match="step's deadline.*--max-loras >= the number of trainers"):
        sync_adapter(cfg, adapters[2], "third-trainer", None, deadline=StepDeadline(0))  # a step with no time left
    for name in ("other-trainer-2", "waiting-trainer"):
        asyncio.run(call("unload_adapter", name))
