"""policy_gen streams (issue 24, item 4): the real `openai` client's stream=True, chat and
completions, n >= 1, logprobs when asked, usage in the last chunk with stream_options; the
streamed text equals the unstreamed reply with the same seed. hf backend over real HTTP."""

from __future__ import annotations

import time

import httpx
import pytest

from _serving_support import ThreadServer, metric

KEY = "stream-key"


@pytest.fixture(scope="module")
def svc(tiny_models):
    from services.policy_gen.app import create_app
    from services.policy_gen.hf_backend import HFBackend
    from services.policy_gen.settings import PolicyGenSettings

    settings = PolicyGenSettings(model_path=str(tiny_models["policy"]), api_key=KEY, max_model_len=256)
    with ThreadServer(create_app(settings, HFBackend(settings)), settings) as srv:
        yield srv.wait_ready(headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def client(svc):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=svc.url + "/v1", api_key=KEY, max_retries=0)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_chat_stream_matches_the_unstreamed_reply(client):
    kw = dict(model="policy", messages=MESSAGES, max_tokens=12, seed=5, n=2, temperature=1.0)
    whole = client.chat.completions.create(**kw)
    texts, finish, roles, usage = ["", ""], [None, None], set(), None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                                logprobs=True, top_logprobs=2):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles.add(c.delta.role)
            if c.logprobs is not None and c.logprobs.content:
                assert len(c.logprobs.content) == 1 and len(c.logprobs.content[0].top_logprobs) == 2
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices] and "assistant" in roles
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_with_logprobs_and_a_stop_string(client):
    kw = dict(model="policy", prompt="Once upon a time", max_tokens=16, seed=2, n=1, temperature=0.0)
    whole = client.completions.create(**kw)
    stop = whole.choices[0].text[4:7]  # a stop string the greedy text surely meets (cut there)
    cut = client.completions.create(**kw, stop=[stop])
    text, tokens, reason = "", 0, None
    for chunk in client.completions.create(**kw, stop=[stop], stream=True, logprobs=1):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += len(c.logprobs.tokens)
            reason = c.finish_reason or reason
    assert text == cut.choices[0].text and stop not in text
    assert reason == "stop" and tokens == cut.usage.completion_tokens


def test_a_client_that_stops_reading_a_stream_aborts_its_sequences(svc):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "go", "max_tokens": 200, "ignore_eos": True, "n": 4, "stream": True}
    with httpx.Client(base_url=svc.url, headers=headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 5:
                    break  # hang up mid-stream
    # The engine stops the 4 sequences at its next step: far fewer than 4 x 200 tokens are made.
    deadline = time.monotonic() + 10
    while metric(svc.url, "policy_gen_generated_tokens_total", headers) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 < metric(svc.url, "policy_gen_generated_tokens_total", headers) < 4 * 200
