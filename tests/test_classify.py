"""`POST /classify`: vLLM's classification API on the reward services, over real HTTP.

Shaped from vLLM's documented contract (request: model, input as text / texts / token ids,
use_activation, truncate_prompt_tokens, add_special_tokens, user; reply: id "classify-…",
object "list", created, model, data[{index, label, probs, num_classes}], usage) and from the
way verl's reward loop reads it: `use_activation: false`, then `data[-1].probs[-1]`.
The numbers must be the ones /v1/score and /get_reward give for the same templated text.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import pytest
from _support import make_score_adapter

from services.common.chat import format_pair
from services.common.process import ServiceProcess, free_port, python_module
from services.common.protocol import ClassifyResponse, ErrorResponse, GetRewardResponse, ScoreResponse
from services.common.truncation import Truncated

KEY = "classify-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 64
PAIRS = [("hi", "hello there"), ("What is the capital of France?", "Paris, of course."), ("count", "one two three")]
LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog and bakes bread in a hot oven"] * 8)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def svc(tiny_models, tmp_path_factory):
    """reward_abs: /v1/score gives both the logit and its sigmoid to compare against."""
    port = free_port()
    argv = python_module(
        "services.reward_abs", "--model-path", str(tiny_models["reward_abs"]), "--port", str(port),
        "--api-key", KEY, "--max-items", "4", "--max-body-bytes", "16384", "--max-tokens", str(MAX_TOKENS),
        "--min-prompt-tokens", "16", "--dtype", "float32", "--log-level", "warning",
    )  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "reward_abs_classify.log"
    with ServiceProcess(argv, port, log_path=log, startup_timeout=180) as service:
        yield service


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["reward_abs"])


def classify(svc: ServiceProcess, body: dict) -> ClassifyResponse:
    r = httpx.post(svc.url + "/classify", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return ClassifyResponse.model_validate(r.json())


def score(svc: ServiceProcess, pairs) -> ScoreResponse:
    items = [{"prompt": p, "response": r} for p, r in pairs]
    r = httpx.post(svc.url + "/v1/score", json={"items": items}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate(r.json())


def get_reward(svc: ServiceProcess, texts: list[str]) -> GetRewardResponse:
    r = httpx.post(svc.url + "/get_reward", json={"query": texts}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return GetRewardResponse.model_validate(r.json())


def templated(prompt: str, response: str) -> str:
    p, r = format_pair(prompt, response)
    return p + r


def probs(res: ClassifyResponse) -> list[float]:
    assert [d.index for d in res.data] == list(range(len(res.data)))
    assert all(d.num_classes == 1 and len(d.probs) == 1 for d in res.data)
    return [d.probs[0] for d in res.data]


# ---------------------------------------------------------------- the contract


def test_string_input_reply_shape(svc, tiny_models):
    text = templated(*PAIRS[0])
    before = int(time.time())
    res = classify(svc, {"model": "reward_abs", "input": text, "user": "someone"})
    assert res.id.startswith("classify-") and int(res.id.removeprefix("classify-"), 16) >= 0
    assert res.object == "list" and res.model == "reward_abs"
    assert before - 1 <= res.created <= int(time.time()) + 1
    (item,) = res.data
    config = json.loads((Path(tiny_models["reward_abs"]) / "config.json").read_text())
    assert item.label == config.get("id2label", {}).get("0")  # the model's own name of its one class
    reference = score(svc, [PAIRS[0]])
    assert res.usage.prompt_tokens == res.usage.total_tokens == reference.usage.tokens
    assert res.usage.completion_tokens == 0
    assert item.probs == pytest.approx(reference.probabilities, abs=1e-5)  # vLLM's default: activation on
    raw = httpx.post(svc.url + "/classify", json={"input": text}, headers=AUTH).json()
    assert set(raw) == {"id", "object", "created", "model", "data", "usage"}
    assert set(raw["data"][0]) == {"index", "label", "probs", "num_classes"}


def test_list_input_equals_score_and_get_reward(svc):
    texts = [templated(p, r) for p, r in PAIRS]
    reference = score(svc, PAIRS)
    openrlhf = get_reward(svc, texts)
    logits = probs(classify(svc, {"input": texts, "use_activation": False}))
    assert logits == pytest.approx(reference.scores, abs=1e-5)
    assert logits == pytest.approx(openrlhf.rewards, abs=1e-5)
    activated = probs(classify(svc, {"input": texts, "use_activation": True}))
    assert activated == pytest.approx(reference.probabilities, abs=1e-5)
    assert activated == pytest.approx([sigmoid(x) for x in logits], abs=1e-9)
    assert probs(classify(svc, {"input": texts})) == pytest.approx(activated, abs=1e-9)
    # Older verl (and vLLM < 0.15 clients) send the deprecated name.
    assert probs(classify(svc, {"input": texts, "activation": False})) == pytest.approx(logits, abs=1e-9)
    # The logits differ per text, so an answer in the wrong order would not pass.
    assert len({round(x, 4) for x in logits}) == len(logits)


def test_verl_read_path(svc):
    """verl's RewardLoopWorker: one templated text, use_activation false, data[-1].probs[-1]."""
    prompt, response = PAIRS[1]
    payload = {"model": "reward_abs", "input": templated(prompt, response), "use_activation": False}
    r = httpx.post(svc.url + "/classify", json=payload, headers=AUTH)
    assert r.status_code == 200, r.text
    rm_score = r.json()["data"][-1]["probs"][-1]
    assert rm_score == pytest.approx(score(svc, [(prompt, response)]).scores[0], abs=1e-5)


def test_token_id_inputs_are_scored_as_given(svc, tokenizer):
    texts = [templated(p, r) for p, r in PAIRS[:2]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    from_text = probs(classify(svc, {"input": texts, "use_activation": False}))
    one = classify(svc, {"input": ids[0], "use_activation": False})
    assert probs(one) == pytest.approx(from_text[:1], abs=1e-5)
    assert one.usage.prompt_tokens == len(ids[0])
    many = classify(svc, {"input": ids, "use_activation": False})
    assert probs(many) == pytest.approx(from_text, abs=1e-5)
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(map(len, ids))
    # Ids are not re-tokenized: dropping the last id changes the score.
    shorter = probs(classify(svc, {"input": ids[0][:-1], "use_activation": False}))
    assert shorter[0] != pytest.approx(from_text[0], abs=1e-6)


def test_truncation_only_when_asked_then_as_get_reward(svc, tokenizer):
    """As vLLM: past max_tokens is a 400 unless truncate_prompt_tokens asks for the cut; the cut
    keeps the last tokens, as /get_reward's."""
    long_text = templated(LONG_PROMPT, "a short answer")
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) > MAX_TOKENS
    err = assert_error(httpx.post(svc.url + "/classify", json={"input": long_text}, headers=AUTH), 400)
    assert "maximum context length is 64" in err.error.message and "truncate_prompt_tokens" in err.error.message
    res = classify(svc, {"input": long_text, "truncate_prompt_tokens": -1, "use_activation": False})
    assert res.usage.prompt_tokens == MAX_TOKENS  # cut from the left, as /get_reward
    assert probs(res) == pytest.approx(get_reward(svc, [long_text]).rewards, abs=1e-5)
    # The same as sending the last MAX_TOKENS ids, or all ids with truncate_prompt_tokens -1.
    tail = probs(classify(svc, {"input": ids[-MAX_TOKENS:], "use_activation": False}))
    assert probs(res) == pytest.approx(tail, abs=1e-5)
    cut = classify(svc, {"input": ids, "truncate_prompt_tokens": -1, "use_activation": False})
    assert probs(cut) == pytest.approx(tail, abs=1e-5) and cut.usage.prompt_tokens == MAX_TOKENS
    # truncate_prompt_tokens N keeps the last N tokens of a text.
    ten = classify(svc, {"input": long_text, "truncate_prompt_tokens": 10, "use_activation": False})
    assert ten.usage.prompt_tokens == 10
    assert probs(ten) == pytest.approx(probs(classify(svc, {"input": ids[-10:], "use_activation": False})), abs=1e-5)


# ---------------------------------------------------------------- bad input, auth


def test_token_ids_over_the_cap_or_outside_the_vocabulary_are_400(svc, tokenizer):
    vocab = len(tokenizer)
    for body, needle in [
        ({"input": [1] * (MAX_TOKENS + 1)}, "truncate_prompt_tokens"),
        ({"input": [[5, 6], [1, 10**9]]}, "input[1]"),
        ({"input": [vocab + 10_000]}, "vocabulary"),
        ({"input": "hi", "truncate_prompt_tokens": MAX_TOKENS + 1}, f"max_tokens={MAX_TOKENS}"),
    ]:
        err = assert_error(httpx.post(svc.url + "/classify", json=body, headers=AUTH), 400)
        assert needle in err.error.message, err.error.message


BAD = [
    ("malformed json", b'{"input": [', 400),
    ("no input", json.dumps({"model": "reward_abs"}).encode(), 400),
    ("empty list", json.dumps({"input": []}).encode(), 400),
    ("empty string", json.dumps({"input": ""}).encode(), 400),
    ("empty token list", json.dumps({"input": [[]]}).encode(), 400),
    ("negative token id", json.dumps({"input": [-1]}).encode(), 400),
    ("float token id", json.dumps({"input": [1.5]}).encode(), 400),
    ("mixed list", json.dumps({"input": ["a", 1]}).encode(), 400),
    ("input an object", json.dumps({"input": {"text": "a"}}).encode(), 400),
    ("use_activation a string", json.dumps({"input": "a", "use_activation": "no"}).encode(), 400),
    ("disagreeing activation", json.dumps({"input": "a", "use_activation": True, "activation": False}).encode(), 400),
    ("truncate_prompt_tokens 0", json.dumps({"input": "a", "truncate_prompt_tokens": 0}).encode(), 400),
    ("truncate_prompt_tokens -2", json.dumps({"input": "a", "truncate_prompt_tokens": -2}).encode(), 400),
    ("chat messages", json.dumps({"messages": [{"role": "user", "content": "a"}]}).encode(), 400),
    ("removed normalize", json.dumps({"input": "a", "normalize": True}).encode(), 400),
    ("priority without priority scheduling", json.dumps({"input": "a", "priority": 1}).encode(), 400),
    ("truncation_side middle", json.dumps({"input": "a", "truncation_side": "middle"}).encode(), 400),
    ("unpaired surrogate", b'{"input": "\\ud83d"}', 400),
    ("too many inputs", json.dumps({"input": ["a"] * 5}).encode(), 413),
    ("body over the cap", json.dumps({"input": "a" * 20000}).encode(), 413),
    ("unknown model", json.dumps({"model": "gpt-9", "input": "a"}).encode(), 404),
]


def assert_error(r: httpx.Response, status: int) -> ErrorResponse:
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate(r.json())
    assert err.error.code == status and err.error.message
    return err


@pytest.mark.parametrize("name, body, status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(svc, name, body, status):
    r = httpx.post(svc.url + "/classify", content=body, headers={**AUTH, "content-type": "application/json"})
    assert_error(r, status)


def test_auth_and_openapi(svc):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert_error(httpx.post(svc.url + "/classify", json={"input": "hi"}, headers=headers), 401)
    spec = httpx.get(svc.url + "/openapi.json", headers=AUTH).json()
    op = spec["paths"]["/classify"]["post"]
    assert {"400", "401", "404", "413", "503"} <= set(op["responses"]) and op["security"] == [{"bearer": []}]
    # Its own successful call: the counter must not depend on another test having run first
    # (a random-order run caught that).
    assert httpx.post(svc.url + "/classify", json={"input": "hi"}, headers=AUTH).status_code == 200
    metrics = httpx.get(svc.url + "/metrics", headers=AUTH).text
    assert 'crs_requests_total{endpoint="/classify",status="200"}' in metrics


# ---------------------------------------------------------------- special tokens (in process)


def test_special_tokens_frame_texts_but_never_token_ids(tiny_models):
    """The tiny tokenizer adds no BOS, so the HTTP tests cannot see this: a BOS-adding
    tokenizer is simulated by giving the engine affixes, as special_affixes() would find."""
    from services.common.http import APIError
    from services.reward.app import encode_classify, frame_text_row
    from services.reward.engine import EngineOptions, load_engine

    assert frame_text_row(Truncated([5, 6, 7], False), 10, [1], [2]) == Truncated([1, 5, 6, 7, 2], False)
    assert frame_text_row(Truncated([5, 6, 7], True), 4, [1], [2]) == Truncated([1, 6, 7, 2], True)
    with pytest.raises(ValueError, match="no room"):
        frame_text_row(Truncated([5], False), 2, [1], [2])

    engine = load_engine(EngineOptions(str(tiny_models["reward_abs"]), dtype="float32", device="cpu", max_tokens=32))
    engine.prefix, engine.suffix = [1], [2]
    text = templated("hi", "hello")
    plain = engine.encode_queries([text])[0].ids
    (framed,) = encode_classify(engine, [text], [], None, True)
    assert framed.ids == [1, *plain, 2]
    assert encode_classify(engine, [text], [], None, False)[0].ids == plain
    assert encode_classify(engine, [], [plain], None, True)[0].ids == plain  # ids: as given
    (kept,) = encode_classify(engine, [text], [], 5, True)  # the cap counts BOS/EOS, which survive
    assert kept == Truncated([1, *plain[-3:], 2], True)
    with pytest.raises(APIError, match="no room"):
        encode_classify(engine, [text], [], 2, True)


# ---------------------------------------------------------------- reward_shared (same app factory)


def test_reward_shared_engines_serve_classify(tiny_models, tmp_path_factory):
    """reward_shared runs this same route on AdapterEngines, whose model is the PEFT-injected
    one: the label and the vocabulary check must read through it. In process, because a third
    service process would cost ~50 s of CI; the route itself is the one tested over HTTP above."""
    from services.common.http import APIError
    from services.reward.app import encode_classify
    from services.reward.engine import EngineOptions
    from services.reward_shared.engine import AdapterSpec, load_shared_engines

    root = tmp_path_factory.mktemp("classify-adapters")
    base = tiny_models["reward_pref"]
    specs = [AdapterSpec(kind, str(make_score_adapter(base, root / kind, seed)),
                         EngineOptions(str(root / kind), dtype="float32"))
             for kind, seed in (("preference", 1), ("absolute", 2))]
    engines = load_shared_engines(str(base), specs)
    text = templated(*PAIRS[1])
    logits = {}
    for kind, engine in engines.items():
        (row,) = encode_classify(engine, [text], [], None, True)
        assert encode_classify(engine, [], [row.ids], None, True)[0].ids == row.ids
        with pytest.raises(APIError, match="vocabulary"):
            encode_classify(engine, [], [[engine.model.get_input_embeddings().num_embeddings]], None, True)
        assert (engine.model.config.id2label or {}).get(0) == "LABEL_0"
        assert row.ids == engine.encode_pairs([format_pair(*PAIRS[1])])[0].ids  # /v1/score's row
        logits[kind] = engine.score_ids([row.ids])[0]
    assert logits["preference"] != pytest.approx(logits["absolute"], abs=1e-3)  # each its own adapter
