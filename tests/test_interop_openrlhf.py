"""OpenRLHF's reward clients, unchanged, against the live reward services: rewards equal /v1/score.

OpenRLHF's HTTP reward client has had three shapes; each posts `{"query", "prompts", "labels"}`
with no headers to every URL of `--remote_rm_url` / `--reward.remote_url`, a query being the
rollout's prompt and reply ids decoded with their special tokens:

- 0.11.x (`openrlhf==0.11.2`, installed `--no-deps` by scripts/install.sh):
  `SingleTurnAgentExecutor.execute` -> `_fetch_rewards_via_http` (aiohttp), one query per
  rollout, the URLs taken in turn. A reply cut at max tokens comes without its end marker.
- 0.9.1-0.10.x: the same executor, but every query list is split over ALL the URLs, so with
  two URLs the second gets `{"query": []}` for every rollout (tests/third_party/openrlhf/,
  0.10.4's `openrlhf/utils/agent.py`, as published).
- <= 0.9.0: `openrlhf/utils/remote_rm_utils.py` (requests), the queries batch-decoded from
  right-padded sequences, so they end in pad tokens (third_party: 0.8.2's, the last with
  `remote_rm_fn`).

OpenRLHF's own reward server strips pad/EOS strings from both ends of a query and closes it with
EOS; /get_reward does the same with the chat end marker, so each equals /v1/score's reward for
the same conversation. Two versions of one package cannot be installed side by side, hence the
pinned files (README there; the test checks each file's sha256 against the wheel's RECORD).
The session's shared reward services (no key) serve the tests; the `?api_key=` one runs a keyed
service in-process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import math
from pathlib import Path
from types import ModuleType, SimpleNamespace

import httpx
import pytest
from _support import score_messages

THIRD_PARTY = Path(__file__).parent / "third_party" / "openrlhf"
# sha256 of each file as the published wheel's RECORD lists it (urlsafe base64, no padding).
PINNED = {
    "agent_0_10_4.py": "LFSbO_R7QuWQidWHYGtyca6SJjdgAlZRsX5KJTetadw",
    "remote_rm_utils_0_8_2.py": "r197RyRCQVvzz_F2akL73M782oHVC2Dy-JUPBMTRg44",
}
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And an even one?"},
]
REPLY = "Two, the only even prime."


def pinned(name: str) -> ModuleType:
    """An OpenRLHF module file from tests/third_party/openrlhf, run as published (hash-checked).
    Its own imports (aiohttp, requests, ray, torch, openrlhf.utils.logging_utils) are real."""
    path = THIRD_PARTY / name
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
    assert digest == PINNED[name], f"{path} is not the published file"
    spec = importlib.util.spec_from_file_location(f"openrlhf_pinned_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["policy"])


@pytest.fixture(scope="module")
def urls(reward_pref_url, reward_abs_url) -> dict[str, str]:
    return {"pref": reward_pref_url, "abs": reward_abs_url}


def v1_score(url: str, reply: str) -> float:
    return score_messages(url, [*CONVERSATION, {"role": "assistant", "content": reply}])


class Rollout:
    """The engine's side of OpenRLHF's executor: the ids vLLM generated for the prompt (the test's
    input, as verl's test hands its reward loop response ids); everything after is OpenRLHF's."""

    def __init__(self, ids: list[int], finish_reason: str):
        self.output = SimpleNamespace(token_ids=ids, finish_reason=finish_reason, logprobs=None)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        return SimpleNamespace(outputs=[self.output])


def execute(executor, tok, reply_ids: list[int], finish_reason: str = "stop") -> dict:
    """One rollout through OpenRLHF's SingleTurnAgentExecutor.execute (prompt templated as its
    prompts dataset does with --apply_chat_template)."""
    prompt = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    return asyncio.run(executor.execute(prompt, None, params, 512, tok, Rollout(reply_ids, finish_reason)))


def reply_ids(tok, text: str, eos: bool = True) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])


# ---------------------------------------------------------------- 0.11.x, installed


def test_openrlhf_0_11_executor_rewards_equal_v1_score(urls, tok):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    # train_ppo_ray splits --reward.remote_url on commas; 0.11 takes the URLs in turn per rollout.
    executor = SingleTurnAgentExecutor(f"{urls['pref']}/get_reward,{urls['abs']}/get_reward".split(","))
    first = execute(executor, tok, reply_ids(tok, REPLY))
    second = execute(executor, tok, reply_ids(tok, REPLY))
    cut = "Two, the only"  # finish_reason "length": the reply has no end marker
    third = execute(executor, tok, reply_ids(tok, cut, eos=False), finish_reason="length")
    assert first["reward"] == pytest.approx([v1_score(urls["pref"], REPLY)], abs=1e-5)
    assert first["scores"] == first["reward"]  # preference: scores are the logits
    absolute = v1_score(urls["abs"], REPLY)
    assert second["reward"] == pytest.approx([absolute], abs=1e-5)  # the second URL: reward_abs
    assert second["scores"] == pytest.approx([1 / (1 + math.exp(-absolute))], abs=1e-6)
    assert third["truncated"] is True
    assert third["reward"] == pytest.approx([v1_score(urls["pref"], cut)], abs=1e-5)
    assert first["reward"] != pytest.approx(third["reward"], abs=1e-4)


# ---------------------------------------------------------------- 0.9.1-0.10.x, pinned file


def test_openrlhf_0_10_two_urls_send_an_empty_batch_and_it_is_answered(urls, tok):
    agent = pinned("agent_0_10_4.py")
    executor = agent.SingleTurnAgentExecutor([f"{urls['pref']}/get_reward", f"{urls['abs']}/get_reward"])
    out = execute(executor, tok, reply_ids(tok, REPLY))
    # Before empty batches were answered, the second URL's 400 made OpenRLHF retry five times and
    # log "Failed to fetch reward" at INFO, leaving the rollout's reward None.
    assert out["reward"] == pytest.approx([v1_score(urls["pref"], REPLY)], abs=1e-5)
    query = tok.decode(tok(out["prompt"], add_special_tokens=False)["input_ids"] + reply_ids(tok, REPLY))
    replies = asyncio.run(executor._fetch_rewards_via_http([query], [out["prompt"]], [None]))
    assert replies[1] == {"rewards": [], "scores": [], "extra_logs": {}}
    assert replies[0]["rewards"] == pytest.approx(out["reward"], abs=1e-6)


# ---------------------------------------------------------------- <= 0.9.0, pinned file


def test_openrlhf_remote_rm_fn_with_right_padded_queries(urls, tok):
    import torch

    remote_rm_utils = pinned("remote_rm_utils_0_8_2.py")
    prompt_ids = tok(tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    replies = [REPLY, "Two.", "Two, the only"]
    # As its experience maker: prompt + reply ids (+ EOS when generation stopped without one),
    # right-padded to the longest (Samples.concat_samples), decoded with special tokens.
    rows = [prompt_ids + reply_ids(tok, r) for r in replies]
    width = max(map(len, rows))
    queries = tok.batch_decode([r + [tok.pad_token_id] * (width - len(r)) for r in rows], skip_special_tokens=False)
    assert queries[1].endswith(tok.pad_token * (width - len(rows[1])))
    rewards = remote_rm_utils.remote_rm_fn(f"{urls['abs']}/get_reward", queries, ["p"] * 3, [None] * 3)
    assert isinstance(rewards, torch.Tensor) and rewards.shape == (3,)
    want = [v1_score(urls["abs"], r) for r in replies]
    assert rewards.tolist() == pytest.approx(want, abs=1e-5)
    assert len({round(w, 4) for w in want}) == 3  # distinct, so an answer in the wrong order fails


def test_the_key_in_the_url_as_the_docs_write_it(tiny_models, tok):
    """docs/reward_services.md: `--reward.remote_url "http://host:port/get_reward?api_key=$KEY"`,
    with both client shapes (aiohttp, requests), against a service with --api-key."""
    from _serving_support import ThreadServer
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from services.reward.app import build_app
    from services.reward_pref.settings import RewardPrefSettings

    settings = RewardPrefSettings(model_path=str(tiny_models["reward_pref"]), api_key="orl-key")
    with ThreadServer(build_app(settings, "preference"), settings) as srv:
        srv.wait_ready()
        want = score_messages(srv.url, [*CONVERSATION, {"role": "assistant", "content": REPLY}],
                              {"Authorization": "Bearer orl-key"})
        url = f"{srv.url}/get_reward?api_key=orl-key"
        out = execute(SingleTurnAgentExecutor([url]), tok, reply_ids(tok, REPLY))
        assert out["reward"] == pytest.approx([want], abs=1e-5)
        query = tok.apply_chat_template([*CONVERSATION, {"role": "assistant", "content": REPLY}], tokenize=False)
        rewards = pinned("remote_rm_utils_0_8_2.py").remote_rm_fn(url, [query], ["p"], [None])
        assert rewards.tolist() == pytest.approx([want], abs=1e-5)
        assert httpx.post(f"{srv.url}/get_reward", json={"query": [query]}).status_code == 401


def test_empty_batch_is_an_empty_reply_and_bad_queries_still_400(urls):
    r = httpx.post(urls["pref"] + "/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert r.status_code == 200 and r.json() == {"rewards": [], "scores": [], "extra_logs": {}}
    for body in ({"query": [""]}, {"query": "text"}, {"prompts": ["x"]}, {"query": [5]}):
        assert httpx.post(urls["pref"] + "/get_reward", json=body).status_code == 400, body


def test_openrlhf_query_strips_fillers_at_both_ends_and_closes_the_reply():
    from services.reward.app import openrlhf_query

    end, fillers = "<|im_end|>", ["<pad>", "<|im_end|>"]
    assert openrlhf_query("<pad>u\nhi<|im_end|><pad><pad>", end, fillers) == "u\nhi<|im_end|>"
    assert openrlhf_query("u\nhi", end, fillers) == "u\nhi<|im_end|>"  # cut at max tokens
    assert openrlhf_query("u\nhi<|im_end|><|im_end|><pad>", end, fillers) == "u\nhi<|im_end|>"
    assert openrlhf_query("<pad><pad>", end, fillers) == "<|im_end|>"
    # EOS distinct from the end marker (a base tokenizer's <|endoftext|>, also its pad): kept marker.
    assert openrlhf_query("a<|im_end|><|endoftext|>", end, ["<|endoftext|>"]) == "a<|im_end|>"
    assert openrlhf_query("a<|im_end|>\n", end, ["<pad>"]) == "a<|im_end|>\n"  # a template's newline
    assert openrlhf_query("a<pad>b", end, [None, "", "<pad>"]) == "a<pad>b<|im_end|>"  # inside: text
