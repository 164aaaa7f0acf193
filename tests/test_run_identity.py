"""Run identity end to end: trainers' X-CRS-* headers counted per run by real servers.

One reward_pref process (with an API key, a small run-label bound and debug logs) and one
policy_gen (hf backend) process, both on loopback with the tiny models. Counts are read back
from each server's own /metrics and compared with what the requests carried and what the
responses reported as usage.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from _support import running, service
from prometheus_client.parser import text_string_to_metric_families

from services.common.identity import run_headers
from services.common.process import ServiceProcess, free_port, python_module
from trainer.clients.reward import RewardClient, messages_item
from trainer.ppo.config import PPOConfig, run_tag

KEY = "run-identity-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_RUNS = 3  # --max-tracked-runs of the reward server; the bound test fills it
CONV = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    """{'reward': ServiceProcess, 'policy': ServiceProcess}, started side by side (start-up dominates)."""
    logs = tmp_path_factory.mktemp("run-identity-logs")
    reward_port, policy_port = free_port(), free_port()
    reward = ServiceProcess(python_module(
        "services.reward_pref", "--model-path", str(tiny_models["reward_pref"]), "--port", str(reward_port),
        "--api-key", KEY, "--max-tracked-runs", str(MAX_RUNS), "--log-level", "debug",
    ), reward_port, log_path=logs / "reward.log", startup_timeout=180, name="reward_pref")  # fmt: skip
    policy = ServiceProcess(python_module(
        "services.policy_gen", "--backend", "hf", "--model-path", str(tiny_models["policy"]), "--port", str(policy_port),
        "--max-model-len", "256", "--max-wait-ms", "1",
    ), policy_port, log_path=logs / "policy.log", startup_timeout=180, name="policy_gen")  # fmt: skip
    try:
        for svc in (reward.start(), policy.start()):
            svc.wait_ready()
        yield {"reward": reward, "policy": policy}
    finally:
        reward.stop()
        policy.stop()


def run_counters(url: str, headers: dict | None = None) -> dict[str, dict[str, float]]:
    """{'requests'|'items'|'tokens': {run label: value}} from a server's /metrics."""
    text = httpx.get(url + "/metrics", headers=headers).text
    out: dict[str, dict[str, float]] = {"requests": {}, "items": {}, "tokens": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for kind, by_run in out.items():
                if sample.name == f"crs_run_{kind}_total":
                    by_run[sample.labels["run"]] = sample.value
    return out


def delta(before: dict, after: dict, kind: str, run: str) -> float:
    return after[kind].get(run, 0.0) - before[kind].get(run, 0.0)


def score(url: str, n_items: int, headers: dict | None = None, key: dict = AUTH) -> httpx.Response:
    items = [{"prompt": f"Question {i}?", "response": "An answer " * (i + 1)} for i in range(n_items)]
    return httpx.post(url + "/v1/score", json={"items": items}, headers={**key, **(headers or {})}, timeout=60)


def test_requests_items_and_tokens_counted_under_their_run(servers):
    url = servers["reward"].url
    before = run_counters(url, AUTH)
    replies = [score(url, n, run_headers("alpha", 3, "ppo-0badc0de-step-000003")) for n in (3, 2)]
    assert [r.status_code for r in replies] == [200, 200], replies[0].text
    after = run_counters(url, AUTH)
    assert delta(before, after, "requests", "alpha") == 2
    assert delta(before, after, "items", "alpha") == 5
    assert delta(before, after, "tokens", "alpha") == sum(r.json()["usage"]["tokens"] for r in replies) > 0
    # /metrics scrapes belong to no run: nothing landed in "other" meanwhile.
    assert all(delta(before, after, kind, "other") == 0 for kind in ("requests", "items", "tokens"))


def test_reward_client_sends_the_run_headers(servers):
    url = servers["reward"].url
    items = [messages_item(CONV, reply) for reply in ("Blue.", "Red, mostly.", "")]
    before = run_counters(url, AUTH)

    async def go():
        async with RewardClient([url], api_key=KEY, headers=run_headers("client-run", 7, "ppo-12345678-step-000007")) as c:
            return await c.score(items)

    assert len(asyncio.run(go()).scores) == 3
    after = run_counters(url, AUTH)
    assert delta(before, after, "requests", "client-run") == 1
    assert delta(before, after, "items", "client-run") == 3
    log = servers["reward"].log_path.read_text()
    assert "run=client-run step=7 adapter=ppo-12345678-step-000007" in log, "the request log names the run"


def test_rollout_workers_reward_clients_carry_the_run(servers, tmp_path):
    """The rollout worker's clients send cfg.run_id, the step and the adapter: counted under run.name."""
    from trainer.ppo.rollout import RolloutWorker

    url = servers["reward"].url
    cfg = PPOConfig.model_validate({"services": {"reward_pref_urls": [url], "api_key": KEY},
                                    "run": {"output_dir": str(tmp_path), "name": "rollout-run"}})
    before = run_counters(url, AUTH)

    async def go():
        async with RolloutWorker(cfg)._reward_client([url], "reward_pref", 4, "ppo-x-step-000004") as client:
            return await client.score([messages_item(CONV, "Green.")])

    asyncio.run(go())
    assert delta(before, after := run_counters(url, AUTH), "requests", "rollout-run") == 1
    assert delta(before, after, "items", "rollout-run") == 1
    assert "run=rollout-run step=4 adapter=ppo-x-step-000004" in servers["reward"].log_path.read_text()


def test_run_id_is_the_name_or_the_folder_tag(tmp_path):
    assert PPOConfig.model_validate({"run": {"output_dir": str(tmp_path)}}).run_id == run_tag(tmp_path)
    assert run_tag(tmp_path).startswith("ppo-") and len(run_tag(tmp_path)) == 12
    assert PPOConfig.model_validate({"run": {"name": "w0.25_seed-1"}}).run_id == "w0.25_seed-1"
    for bad in ("", "has space", "x" * 65, "ünï"):
        with pytest.raises(ValueError, match=r"1-64 characters of \[A-Za-z0-9._-\]"):
            PPOConfig.model_validate({"run": {"name": bad}})


@pytest.mark.parametrize("headers", [
    {}, {"X-CRS-Run": "has space"}, {"X-CRS-Run": "x" * 65}, {"X-CRS-Run": "semi;colon", "X-CRS-Step": "1"},
], ids=["missing", "space", "too-long", "punctuation"])  # fmt: skip
def test_missing_or_invalid_run_is_other(servers, headers):
    url = servers["reward"].url
    before = run_counters(url, AUTH)
    reply = score(url, 2, headers)
    assert reply.status_code == 200, reply.text
    after = run_counters(url, AUTH)
    assert delta(before, after, "requests", "other") == 1
    assert delta(before, after, "items", "other") == 2
    assert delta(before, after, "tokens", "other") == reply.json()["usage"]["tokens"]
    assert set(after["requests"]) - set(before["requests"]) <= {"other"}, "no label made from a bad run id"


def test_unauthenticated_requests_claim_no_run_label(servers):
    url = servers["reward"].url
    reply = score(url, 1, run_headers("intruder", 0, None), key={"Authorization": "Bearer wrong"})
    assert reply.status_code == 401
    assert "intruder" not in run_counters(url, AUTH)["requests"]


def test_runs_beyond_the_bound_are_other(tiny_models, tmp_path):
    """MAX_RUNS + 1 new distinct runs: the label set stops at MAX_RUNS, the rest count as 'other'.
    On a server of its own: a full label table would turn the other tests' runs into 'other'."""
    reward = service("services.reward_pref", "--model-path", str(tiny_models["reward_pref"]), "--api-key", KEY,
                     "--max-tracked-runs", str(MAX_RUNS), "--log-level", "warning", log_dir=tmp_path)
    with running({"reward": reward}):
        _fill_beyond_the_bound(reward.url)


def _fill_beyond_the_bound(url: str) -> None:
    before = run_counters(url, AUTH)
    runs = [f"fill-{i}" for i in range(MAX_RUNS + 1)]
    sizes = {run: i + 1 for i, run in enumerate(runs)}
    for run in runs:
        assert score(url, sizes[run], run_headers(run, 1, None)).status_code == 200
    after = run_counters(url, AUTH)
    tracked = set(after["requests"]) - {"other"}
    assert len(tracked) == MAX_RUNS and runs[-1] not in tracked
    spilled = [run for run in runs if run not in tracked]
    assert spilled, "more distinct runs than labels: some must be 'other'"
    assert delta(before, after, "requests", "other") == len(spilled)
    assert delta(before, after, "items", "other") == sum(sizes[r] for r in spilled)
    for run in set(runs) & tracked:
        assert delta(before, after, "items", run) == sizes[run]


def test_policy_gen_counts_sequences_and_tokens_by_run(servers):
    url = servers["policy"].url
    before = run_counters(url)
    body = {"prompt": ["Hello", "Tell me a story"], "n": 2, "max_tokens": 4, "temperature": 1.0,
            "seed": 1}
    reply = httpx.post(url + "/v1/completions", json=body, headers=run_headers("gen-run", 2, None), timeout=120)
    assert reply.status_code == 200, reply.text
    after = run_counters(url)
    assert delta(before, after, "requests", "gen-run") == 1
    assert delta(before, after, "items", "gen-run") == 4 == len(reply.json()["choices"])  # prompts x n
    assert delta(before, after, "tokens", "gen-run") == reply.json()["usage"]["total_tokens"]
