"""Several policy_gen replicas for one PPO run: config, pool choice, stale filter, and end to end.

The end-to-end test runs two learner workers (one torch.distributed group under local Ray),
two real policy_gen processes (hf backend, tiny policy) and a real reward service (crs.weight 1: one reward process fewer on a small CI box); one replica is
SIGKILLed after step 1 and restarted on its port after step 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from _support import write_prompt_trees
from prometheus_client.parser import text_string_to_metric_families

from services.common.process import ServiceProcess, free_port, python_module
from trainer.clients.policy_pool import NoReplicaAvailable, PolicyPool
from trainer.config_io import ConfigError, load_config
from trainer.ppo.config import PPOConfig, ServicesSection
from trainer.ppo.experience import RolloutSample, drop_stale

# ---------------------------------------------------------------------------- config


def test_policy_url_is_the_one_replica_spelling_of_policy_urls():
    one = ServicesSection(policy_url="http://a:8000/")
    assert one.policy_urls == ["http://a:8000"] and one.policy_url == "http://a:8000"
    assert "policy_urls" not in one.model_dump() and one.model_dump()["policy_url"] == "http://a:8000"
    two = ServicesSection(policy_urls=["http://a", "http://b"], policy_url="")
    assert two.policy_url == "http://a" and two.model_dump()["policy_urls"] == ["http://a", "http://b"]
    assert ServicesSection.model_validate(two.model_dump()).policy_urls == two.policy_urls  # round trip
    with pytest.raises(ConfigError, match="policy_url .* and services.policy_urls .* disagree"):
        load_config(PPOConfig, None, ["services.policy_url=http://c", "services.policy_urls=[http://a, http://b]"])
    with pytest.raises(ConfigError, match="more than once"):
        load_config(PPOConfig, None, ["services.policy_urls=[http://a, http://a/]"])


# ---------------------------------------------------------------------------- pool and stale filter


def test_pool_picks_the_least_busy_healthy_replica_and_rotates_ties():
    pool = PolicyPool(["http://a", "http://b", "http://c"], model="m")
    a, b, c = pool.replicas
    assert [pool.pick().url for _ in range(3)] == ["http://a", "http://b", "http://c"]  # idle: rotation
    a.outstanding, b.outstanding, c.outstanding = 2, 1, 3
    assert {pool.pick().url for _ in range(3)} == {"http://b"}
    b.unhealthy_until = time.monotonic() + 60  # cooling down: skipped although least busy
    assert pool.pick() is a
    a.unhealthy_until = c.unhealthy_until = b.unhealthy_until + 1  # all cooling: the first to recover
    assert pool.pick() is b
    asyncio.run(pool.aclose())


def test_a_refused_replica_cools_down_and_the_request_moves_on():
    """Real connection errors (closed ports): each replica is tried once, then skipped while cooling."""
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def go():
        async with PolicyPool(dead, model="m", unhealthy_cooldown_s=0.3, retry_max_attempts=2) as pool:
            t0 = time.monotonic()
            with pytest.raises(NoReplicaAvailable, match="giving up after retries"):
                await pool.generate(["hi"], model="m")
            assert time.monotonic() - t0 < 2  # the second try went straight to the other replica
            assert pool.failures == 2 and all(r.unhealthy_until > time.monotonic() for r in pool.replicas)
            await asyncio.sleep(0.35)
            assert pool.pick().unhealthy_until <= time.monotonic()  # healthy again after the cooldown

    asyncio.run(go())


def _sample(adapter: str | None) -> RolloutSample:
    return RolloutSample(0, [1], [2], [-0.5], "x", "stop", 0.0, 0.0, adapter=adapter)


def test_a_rollout_from_a_stale_adapter_is_refused():
    kept, dropped = drop_stale([_sample("run-step-000002"), _sample("run-step-000001"), _sample(None)], "run-step-000002")
    assert [s.adapter for s in kept] == ["run-step-000002"] and dropped == 2
    assert drop_stale([_sample(None)], None) == ([_sample(None)], 0)  # step 1: the base model is current


# ---------------------------------------------------------------------------- end to end


def _metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _completions(url: str, status: str = "200") -> float:
    return _metric(url, "policy_gen_requests_total", endpoint="/v1/completions", status=status)


def _held(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]


@pytest.fixture(scope="module")
def replicas(tiny_models, tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("replicas")
    runs = root / "runs"
    runs.mkdir()
    policy = python_module("services.policy_gen", "--backend", "hf", "--model-path", str(tiny_models["policy"]),
                           "--adapter-root", str(runs), "--max-loras", "4")
    argv = {"a": policy, "b": policy,
            "pref": python_module("services.reward_pref", "--model-path", str(tiny_models["reward_pref"]))}

    def process(name: str, port: int) -> ServiceProcess:
        return ServiceProcess([*argv[name], "--port", str(port)], port, log_path=root / f"{name}.log",
                              startup_timeout=180, name=name)

    procs = {name: process(name, free_port()) for name in argv}
    for p in procs.values():
        p.start()
    for p in procs.values():
        p.wait_ready()
    yield {"procs": procs, "process": process, "runs": runs, "prompts": write_prompt_trees(root / "prompts.jsonl"),
           "policy": tiny_models["policy"]}
    for p in procs.values():
        p.stop()


@pytest.mark.slow
def test_two_replicas_share_rollouts_and_a_lost_one_is_resynced_before_it_serves(replicas, caplog):
    from trainer.ppo.driver import adapter_name, train

    procs = replicas["procs"]
    a, b = procs["a"].url, procs["b"].url
    cfg = PPOConfig.model_validate({
        "model": {"policy_path": str(replicas["policy"])},
        "ppo": {"batch_size": 8, "completions_per_prompt": 2, "num_minibatches": 2, "ppo_epochs": 1},
        "generation": {"max_new_tokens": 8, "max_prompt_tokens": 256},
        "crs": {"weight": 1.0},
        "services": {"policy_urls": [a, b], "reward_pref_urls": [procs["pref"].url], "timeout_s": 30,
                     "unhealthy_cooldown_s": 0.5},
        "ray": {"num_cpus": 2},
        "learner": {"num_workers": 2},  # the whole scale-out at once: 2 learner workers x 2 replicas
        "run": {"output_dir": str(replicas["runs"] / "two"), "steps": 4, "checkpoint_every": 10,
                "keep_adapters": None, "data_source": str(replicas["prompts"])},
    })
    seen: dict[int, dict] = {}

    def on_step(row):
        k, name = row["step"], adapter_name(cfg.run_dir, row["step"])
        seen[k] = {"a": (_completions(a), name in _held(a))}
        if k != 2:  # b is down from step 1's end until the restart below
            seen[k]["b"] = (_completions(b), name in _held(b))
        if k == 1:
            os.killpg(procs["b"].proc.pid, signal.SIGKILL)  # no goodbye: as a node that vanishes
            procs["b"].proc.wait(10)
            procs["b"].stop()
        if k == 2:
            procs["b"] = replicas["process"]("b", procs["b"].port).start().wait_ready()

    with caplog.at_level(logging.INFO, logger="crs_rlhf.ppo"):
        summary = train(cfg, on_step=on_step)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert summary.last_step == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["learner/num_workers"] == 2 for r in rows)

    # Step 1: the 4 prompts' requests spread over both replicas, and both hold step 1's adapter.
    assert seen[1]["a"][0] > 0 and seen[1]["b"][0] > 0 and seen[1]["a"][1] and seen[1]["b"][1]
    # Step 2: b is gone; training goes on with a, and the row and one log line say so.
    assert (rows[1]["policy/replicas_in_rotation"], rows[1]["policy/replicas_out"]) == (1, 1)
    assert seen[2]["a"][1]
    out_lines = [r.getMessage() for r in caplog.records if "out of rotation" in r.getMessage()]
    assert len(out_lines) == 1 and b in out_lines[0] and "not ready" in out_lines[0], out_lines
    # Step 3: the restarted b was resynced (holds step 3's adapter) but has served nothing yet:
    # step 3's rollouts skipped it, since it did not hold step 2's adapter.
    assert (rows[2]["policy/replicas_in_rotation"], rows[2]["policy/replicas_out"]) == (2, 0)
    assert seen[3]["b"] == (0, True)
    assert any("back in rotation" in r.getMessage() and b in r.getMessage() for r in caplog.records)
    # Step 4: b serves rollouts again, and never answered a request for a model it lacked.
    assert seen[4]["b"][0] > 0 and seen[4]["a"][1] and seen[4]["b"][1]
    assert _completions(b, "404") == 0 and _metric(b, "policy_gen_adapter_loads_total") == 2  # steps 3 and 4
    # Every rollout came from the adapter the learner expected.
    assert all(r["rollouts/stale_dropped"] == 0 for r in rows)
    assert max(r["logprob_gap/mean"] for r in rows) < 1e-3
    assert _held(a)[1:] == [] and _held(b)[1:] == []  # the run gave its slot back on every replica
