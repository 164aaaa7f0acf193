"""policy_gen streams on the vLLM backend (issue 24, item 4): the real `openai` client's
stream=True through policy_gen's front door to vLLM and back, chat and completions, n >= 1,
logprobs, usage when asked; the streamed reply equals the unstreamed one with the same seed.
The session's shared vLLM server (conftest.py) serves it: no server of its own
(tests/test_policy_gen_stream.py is the hf backend's)."""

from __future__ import annotations

import httpx
import pytest
from _serving_support import metric

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture
def client(vllm_policy_gen):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=vllm_policy_gen.url + "/v1", api_key=vllm_policy_gen.key, max_retries=0,
                       timeout=300) as c:
        yield c


def test_vllm_chat_stream_matches_the_unstreamed_reply(client):
    kw = {"model": "policy", "messages": MESSAGES, "max_tokens": 12, "seed": 5, "n": 2, "temperature": 1.0}
    whole = client.chat.completions.create(**kw)
    texts, finish, roles, usage, logprobs = ["", ""], [None, None], set(), None, [0, 0]
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                                logprobs=True, top_logprobs=2):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles.add(c.delta.role)
            if c.logprobs is not None and c.logprobs.content:
                logprobs[c.index] += len(c.logprobs.content)
                assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices] and "assistant" in roles
    assert usage is not None, "no usage chunk although include_usage was asked"
    assert usage.completion_tokens == whole.usage.completion_tokens == sum(logprobs)
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_vllm_completion_stream_with_logprobs_and_a_stop_string(client):
    kw = {"model": "policy", "prompt": "Once upon a time", "max_tokens": 16, "seed": 2, "temperature": 0.0}
    whole = client.completions.create(**kw)
    stop = whole.choices[0].text[4:7]  # a stop string the greedy text surely meets (cut there)
    cut = client.completions.create(**kw, stop=[stop])
    text, reason, chunks = "", None, 0
    for chunk in client.completions.create(**kw, stop=[stop], stream=True, logprobs=1):
        chunks += 1
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
    assert text == cut.choices[0].text and stop not in text
    assert reason == "stop" and chunks > 1  # it streamed, not one reply


def test_vllm_stream_counts_its_tokens_without_include_usage(vllm_policy_gen):
    """policy_gen_generated_tokens_total counts a streamed reply's tokens whether or not the
    client asked for the usage chunk, and the client gets no usage chunk it did not ask for."""
    url, headers = vllm_policy_gen.url, {"Authorization": f"Bearer {vllm_policy_gen.key}"}
    before = metric(url, "policy_gen_generated_tokens_total", headers)
    body = {"model": "policy", "prompt": "go", "max_tokens": 7, "ignore_eos": True, "n": 2, "stream": True, "seed": 1}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert not any('"usage":{' in e.replace(" ", "") for e in events), "a usage chunk nobody asked for"
    assert metric(url, "policy_gen_generated_tokens_total", headers) - before == 2 * 7


def test_sse_events_are_split_across_chunk_boundaries_and_the_usage_chunk_is_found():
    from services.policy_gen.proxy import _split_events, _usage_event

    text = b'data: {"id":"c","choices":[{"index":0,"text":"hi"}]}\n\n'
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"total_tokens":8,"completion_tokens":5}}\n\n'
    stream = text + usage + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):  # every place a network read may end
        first, rest = _split_events(stream[:cut])
        second, tail = _split_events(rest + stream[cut:])
        assert first + second == [text, usage, b"data: [DONE]\n\n"] and tail == b""
    assert _usage_event(usage) == (5, 3)
    # A chunk with choices is never the usage chunk, even with continuous usage stats or "usage" in its text.
    assert _usage_event(b'data: {"choices":[{"text":"usage"}],"usage":{"completion_tokens":1}}\n\n') is None
    assert _usage_event(b'data: {"choices":[{"text":"\\"usage\\""}]}\n\n') is None
    assert _usage_event(b"data: [DONE]\n\n") is None and _usage_event(b'data: {"choices":[],"usage":null}\n\n') is None
    assert _usage_event(b'data: {"choices":[],"usage":{broken\n\n') is None
