"""Both reward services over real HTTP on loopback, each in its own process, tiny models."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from services.common.chat import format_pair
from services.common.process import ServiceProcess, free_port, python_module
from services.common.protocol import ErrorResponse, GetRewardResponse, ModelList, ScoreResponse

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = "the quick brown fox jumps over the lazy dog and bakes bread in a hot oven".split()


def text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_words))


def start(module: str, model, tmp_path_factory, *flags: str) -> ServiceProcess:
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / f"{module}.log"
    argv = python_module(module, "--model-path", str(model), "--port", str(port), "--log-level", "warning", *flags)
    return ServiceProcess(argv, port, log_path=log, startup_timeout=180)


@pytest.fixture(scope="module")
def pref(tiny_models, tmp_path_factory):
    svc = start("services.reward_pref", tiny_models["reward_pref"], tmp_path_factory,
                "--api-key", KEY, "--max-items", "8", "--max-body-bytes", "65536", "--dtype", "float32",
                "--max-batch-tokens", "8192", "--max-padding", "1.0")  # lots of padding: invariance must hold
    with svc:
        yield svc


@pytest.fixture(scope="module")
def absolute(tiny_models, tmp_path_factory):
    # A tiny queue and a long gather window make overload easy to provoke on purpose.
    svc = start("services.reward_abs", tiny_models["reward_abs"], tmp_path_factory,
                "--max-queue-items", "2", "--max-wait-ms", "150")
    with svc:
        yield svc


def score(svc: ServiceProcess, items: list[dict], **extra) -> ScoreResponse:
    r = httpx.post(svc.url + "/v1/score", json={"items": items, **extra}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate(r.json())


def assert_error(r: httpx.Response, status: int) -> ErrorResponse:
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate(r.json())
    assert err.error.code == status and err.error.message
    return err


# ---------------------------------------------------------------- contracts


def test_models_and_score_contract(pref):
    models = ModelList.model_validate(httpx.get(pref.url + "/v1/models", headers=AUTH).json())
    (card,) = models.data
    assert (card.id, card.kind, card.max_tokens, card.dtype) == ("reward_pref", "preference", 2048, "float32")
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    res = score(pref, [{"prompt": "hi", "response": "hello"}, {"messages": msgs}], model="reward_pref")
    assert res.kind == "preference" and res.model == "reward_pref" and res.probabilities is None
    assert len(res.scores) == 2 and res.truncated == [False, False] and res.usage.tokens > 10
    assert all(math.isfinite(s) for s in res.scores)
    assert httpx.get(pref.url + "/docs", headers=AUTH).status_code == 200


def test_batch_invariance_over_http_and_agreement_with_the_engine(pref, tiny_models):
    from services.reward.engine import EngineOptions, load_engine

    items = [{"prompt": text(n, n), "response": text(m, 1)} for n, m in [(1, 1), (400, 3), (2, 700), (30, 30)]]
    together = score(pref, items).scores
    alone = [score(pref, [it]).scores[0] for it in items]
    assert together == pytest.approx(alone, abs=1e-5)
    engine = load_engine(EngineOptions(str(tiny_models["reward_pref"]), dtype="float32", device="cpu"))
    rows = [e.ids for e in engine.encode_pairs([format_pair(it["prompt"], it["response"]) for it in items])]
    assert together == pytest.approx([engine.score_ids([r])[0] for r in rows], abs=1e-5)


def test_order_is_preserved_under_concurrency(pref):
    items = [{"prompt": text(3 + i % 7, i), "response": text(5 + (i * 37) % 300, i)} for i in range(40)]
    reference = [score(pref, [it]).scores[0] for it in items]
    # Single-item and multi-item requests interleaved, from many concurrent clients.
    requests = [[i] for i in range(24)] + [list(range(24, 32)), list(range(32, 40))[::-1]]

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            async def one(idx):
                r = await client.post(pref.url + "/v1/score", json={"items": [items[i] for i in idx]})
                return idx, ScoreResponse.model_validate(r.json()).scores
            return await asyncio.gather(*(one(idx) for idx in requests * 2))

    for idx, scores in asyncio.run(run()):
        assert scores == pytest.approx([reference[i] for i in idx], abs=1e-5)
    metrics = httpx.get(pref.url + "/metrics", headers=AUTH).text
    assert 'crs_requests_total{endpoint="/v1/score",status="200"}' in metrics
    batch_counts = [line for line in metrics.splitlines() if line.startswith("crs_batch_items_count")]
    items_total = [line for line in metrics.splitlines() if line.startswith("crs_items_scored_total")]
    # Cross-request batching happened: fewer forward passes than items.
    assert float(batch_counts[0].split()[-1]) < float(items_total[0].split()[-1])


def test_long_items_are_truncated_and_flagged(pref):
    res = score(pref, [{"prompt": text(3000), "response": "ok"}, {"prompt": "hi", "response": text(3000)},
                       {"prompt": "hi", "response": "ok"}])
    assert res.truncated == [True, True, False]
    short = score(pref, [{"prompt": "hi", "response": "ok"}])
    assert res.usage.tokens == 2048 * 2 + short.usage.tokens


def test_get_reward_preference_matches_score(pref):
    prompt, response = format_pair("What is 2+2?", "4")
    r = httpx.post(pref.url + "/get_reward", json={"query": [prompt + response], "prompts": ["What is 2+2?"],
                                                   "labels": [None], "extra": 1}, headers=AUTH)
    res = GetRewardResponse.model_validate(r.json())
    assert res.rewards == res.scores
    assert res.rewards == pytest.approx(score(pref, [{"prompt": "What is 2+2?", "response": "4"}]).scores, abs=1e-5)


# ---------------------------------------------------------------- bad input, auth


BAD = [
    ("malformed json", b'{"items": [', 400),
    ("not an object", b'[1, 2]', 400),
    ("wrong type", json.dumps({"items": [{"prompt": 1, "response": "x"}]}).encode(), 400),
    ("items not a list", json.dumps({"items": "abc"}).encode(), 400),
    ("empty list", json.dumps({"items": []}).encode(), 400),
    ("empty prompt", json.dumps({"items": [{"prompt": "", "response": "x"}]}).encode(), 400),
    ("unknown field", json.dumps({"items": [{"prompt": "x", "respnse": "y"}]}).encode(), 400),
    ("not ending with assistant", json.dumps({"items": [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}]}).encode(), 400),
    ("bad role", json.dumps({"items": [{"messages": [
        {"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}]}).encode(), 400),
    ("too many items", json.dumps({"items": [{"prompt": "p", "response": "r"}] * 9}).encode(), 413),
    ("body over the cap", json.dumps({"items": [{"prompt": "p" * 70000, "response": "r"}]}).encode(), 413),
    ("unknown model", json.dumps({"model": "gpt-9", "items": [{"prompt": "p", "response": "r"}]}).encode(), 404),
]


@pytest.mark.parametrize("name, body, status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(pref, name, body, status):
    r = httpx.post(pref.url + "/v1/score", content=body, headers={**AUTH, "content-type": "application/json"})
    assert_error(r, status)


def test_bad_get_reward_input(pref):
    # An empty query list is an empty batch, answered (tests/test_interop_openrlhf.py).
    for body in ({"query": [""]}, {"query": "text"}, {"prompts": ["x"]}, {"query": ["q"] * 9}):
        r = httpx.post(pref.url + "/get_reward", json=body, headers=AUTH)
        assert_error(r, 413 if len(body.get("query", [])) == 9 else 400)


def test_auth_required_except_probes(pref):
    for path in ("/health", "/ready"):
        assert httpx.get(pref.url + path).status_code == 200
    item = {"items": [{"prompt": "p", "response": "r"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert_error(httpx.post(pref.url + "/v1/score", json=item, headers=headers), 401)
        assert_error(httpx.post(pref.url + "/get_reward", json={"query": ["q"]}, headers=headers), 401)
        for path in ("/v1/models", "/metrics", "/docs"):
            assert_error(httpx.get(pref.url + path, headers=headers), 401)


# ---------------------------------------------------------------- the absolute service


def test_absolute_scores_probabilities_and_get_reward(absolute):
    res = score(absolute, [{"prompt": "hi", "response": "hello"}, {"prompt": text(20), "response": text(50)}])
    assert res.kind == "absolute" and res.probabilities is not None
    assert res.probabilities == pytest.approx([1 / (1 + math.exp(-s)) for s in res.scores], abs=1e-9)
    prompt, response = format_pair("hi", "hello")
    r = httpx.post(absolute.url + "/get_reward", json={"query": [prompt + response]})
    reward = GetRewardResponse.model_validate(r.json())
    assert reward.rewards == pytest.approx(res.scores[:1], abs=1e-5)  # logits: the RL signal (docs/method.md)
    assert reward.scores == pytest.approx(res.probabilities[:1], abs=1e-5) and 0 <= reward.scores[0] <= 1


def test_overload_answers_503_with_retry_after(absolute):
    items = [{"prompt": text(50), "response": text(200)}] * 2

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(absolute.url + "/v1/score", json={"items": items}) for _ in range(12)))

    replies = asyncio.run(burst())
    statuses = [r.status_code for r in replies]
    assert 503 in statuses and 200 in statuses, statuses
    for r in replies:
        if r.status_code == 503:
            assert_error(r, 503)
            assert int(r.headers["retry-after"]) >= 1
        else:
            ScoreResponse.model_validate(r.json())
    assert score(absolute, items).scores  # recovers once the burst is over


def test_disconnected_clients_do_not_break_the_worker(absolute):
    with pytest.raises(httpx.TimeoutException):  # gives up while its item waits in the queue
        httpx.post(absolute.url + "/v1/score", json={"items": [{"prompt": "p", "response": text(100)}]}, timeout=0.03)
    assert score(absolute, [{"prompt": "p", "response": "r"}]).scores
    assert httpx.get(absolute.url + "/health").json() == {"status": "ok"}
