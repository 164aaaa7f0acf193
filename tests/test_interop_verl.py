"""verl against a live reward service, with verl's own code unchanged (verl 0.9.1 from PyPI,
installed `--no-deps` by scripts/install.sh with the few modules its imports need).

- verl's reward loop (`RewardLoopWorker.compute_score_disrm`: verl renders the conversation
  with the RM tokenizer's chat template and posts to `http://<router>/classify`, no headers)
  against a service with `--api-key` on, opened for /classify to the loopback network only.
- the `model` verl sends is its `reward.reward_model.model_path` verbatim: any spelling of the
  served folder must be accepted.
- vLLM's optional /classify fields are accepted (and unknown ones ignored), as vLLM does.
- the custom reward function of docs/reward_services.md, loaded by verl's own loader, keeps
  every turn of a multi-turn conversation and equals /v1/score.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import httpx
import pytest
from _support import score_messages, service

from services.common.keyless import client_in, parse_networks

KEY = "verl-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 96
DOCS = Path(__file__).resolve().parents[1] / "docs" / "reward_services.md"
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And an even one?"},
]
REPLY = "Two, the only even prime."


@pytest.fixture(scope="module")
def svc(tiny_models, tmp_path_factory):
    """reward_pref with a key, /classify open to loopback clients only (verl sends no key)."""
    with service(
        "services.reward_pref",
        "--model-path", str(tiny_models["reward_pref"]),
        "--api-key", KEY, "--keyless-routes", "/classify", "--keyless-networks", "127.0.0.0/8",
        "--max-tokens", str(MAX_TOKENS), "--min-prompt-tokens", "16", "--dtype", "float32", "--log-level", "info",
        log_dir=tmp_path_factory.mktemp("logs"), name="reward_pref_verl",
    ) as proc:  # fmt: skip
        yield proc


def v1_score(svc, messages: list[dict]) -> float:
    return score_messages(svc.url, messages, AUTH)


# ---------------------------------------------------------------- auth: the operator's named exception


def test_keyless_route_is_logged_and_only_that_route_skips_the_key(svc):
    log = svc.log_path.read_text()
    assert re.search(r"WARNING .*auth: /classify answer WITHOUT the API key to clients in 127\.0\.0\.0/8", log), log
    body = {"input": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>", "use_activation": False}
    assert httpx.post(svc.url + "/classify", json=body).status_code == 200
    for path, payload in [("/v1/score", {"items": [{"prompt": "hi", "response": "hello"}]}),
                          ("/get_reward", {"query": [body["input"]]}), ("/slime", {"prompt": "hi", "response": "x"})]:
        r = httpx.post(svc.url + path, json=payload)
        assert r.status_code == 401, (path, r.text)
    assert httpx.get(svc.url + "/metrics").status_code == 401


def test_keyless_needs_the_client_in_the_named_network():
    """The network test is the TCP peer's address (loopback tests cannot come from elsewhere)."""
    nets = parse_networks(["10.0.0.0/8", "fd00::/8", "192.168.1.7"])
    assert client_in("10.200.0.1", nets) and client_in("192.168.1.7", nets) and client_in("fd00::1", nets)
    assert client_in("::ffff:10.0.0.5", nets)  # an IPv4 client on a dual-stack socket
    assert not client_in("127.0.0.1", nets) and not client_in("192.168.1.8", nets)
    assert not client_in(None, nets) and not client_in("testclient", nets)
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["10.0.0.0/33"])


def test_keyless_settings_are_checked_at_start(tiny_models):
    from services.reward_pref.settings import RewardPrefSettings

    base = {"model_path": str(tiny_models["reward_pref"])}
    for extra, needle in [
        ({"keyless_routes": ["/classify"]}, "go together"),
        ({"keyless_routes": ["/classify"], "keyless_networks": ["10.0.0.0/8"]}, "needs --api-key"),
        ({"keyless_routes": ["/metrics"], "keyless_networks": ["10.0.0.0/8"], "api_key": "k"}, "cannot be keyless"),
        ({"keyless_routes": ["/classify"], "keyless_networks": ["ten"], "api_key": "k"}, "not an IP network"),
    ]:
        with pytest.raises(ValueError, match=needle):
            RewardPrefSettings(**base, **extra)


def test_keyless_flags_from_the_command_line(tiny_models, tmp_path):
    from services.common.settings import parse_settings
    from services.reward_pref.settings import RewardPrefSettings

    s = parse_settings(RewardPrefSettings, ["--model-path", "m", "--api-key", "k", "--keyless-routes", "/classify",
                                            "--keyless-routes", "/slime", "--keyless-networks", "10.0.0.0/8"])
    assert s.keyless_routes == ["/classify", "/slime"] and s.keyless_networks == ["10.0.0.0/8"]


# ---------------------------------------------------------------- verl's reward loop, unchanged


def verl_worker(tiny_models, address: str, model_path: str):
    """verl's RewardLoopWorker with the attributes its __init__ sets from a full trainer config
    (tokenizers, router address); the scoring method itself is verl's, unchanged."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    worker = RewardLoopWorker.__new__(RewardLoopWorker)
    worker.config = OmegaConf.create({"reward": {"reward_model": {
        "enable": True, "model_path": model_path, "rollout": {"name": "vllm"}}}})
    worker.reward_router_address = address
    worker.input_tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    worker.reward_model_tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward_pref"])
    return worker


def verl_item(tokenizer, chat: list[dict], reply: str):
    """One rollout as verl's trainer hands it to the reward loop: raw_prompt, padded response ids."""
    import numpy as np
    import torch
    from verl import DataProto

    ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    width = len(ids) + 3  # right padding, as verl's rollout batches
    responses = torch.tensor([ids + [tokenizer.pad_token_id or 0] * 3])
    prompt_mask = torch.ones(1, 5, dtype=torch.long)
    response_mask = torch.tensor([[1] * len(ids) + [0] * 3])
    raw_prompt = np.empty(1, dtype=object)
    raw_prompt[0] = chat
    assert responses.shape[-1] == width
    return DataProto.from_dict(
        tensors={"responses": responses, "attention_mask": torch.cat([prompt_mask, response_mask], dim=-1)},
        non_tensors={"raw_prompt": raw_prompt},
    )


def test_verl_reward_loop_scores_with_auth_on_equal_to_v1_score(svc, tiny_models):
    address = f"127.0.0.1:{svc.port}"
    # verl sends reward.reward_model.model_path as `model`: another spelling of the folder.
    spelled = str(tiny_models["reward_pref"]) + "/"
    worker = verl_worker(tiny_models, address, spelled)
    data = verl_item(worker.input_tokenizer, CONVERSATION, REPLY)
    out = asyncio.run(worker.compute_score_disrm(data))
    assert out["reward_score"] == pytest.approx(v1_score(svc, [*CONVERSATION, {"role": "assistant", "content": REPLY}]),
                                                abs=1e-5)


def test_model_path_spellings_are_the_served_model(svc, tiny_models):
    folder = Path(tiny_models["reward_pref"])
    body = {"input": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>"}
    link = folder.parent / "rm-link"
    if not link.exists():
        link.symlink_to(folder)
    for model in ["reward_pref", str(folder), str(folder) + "/", str(folder / ".." / folder.name), str(link)]:
        r = httpx.post(svc.url + "/classify", json={**body, "model": model})
        assert r.status_code == 200, (model, r.text)
    for model in ["reward_abs", str(folder.parent / "reward_abs"), "/", "."]:
        r = httpx.post(svc.url + "/classify", json={**body, "model": model})
        assert r.status_code == 404, (model, r.text)
        message = r.json()["error"]["message"]
        assert "--model-id" in message and (model.startswith("/") or str(folder) not in message)  # no server path


# ---------------------------------------------------------------- vLLM's optional fields


def test_vllm_optional_fields_are_accepted_and_unknown_ones_ignored(svc):
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>"
    plain = httpx.post(svc.url + "/classify", json={"input": text, "use_activation": False}).json()
    extras = {"priority": 0, "request_id": "abc-1", "padding": "max_length", "cache_salt": "s" * 43,
              "mm_processor_kwargs": {}, "truncation_side": "left", "user": "u",
              # embeddings fields and unknown ones: ignored, as vLLM's OpenAIBaseModel does
              "encoding_format": "float", "dimensions": 8, "embed_dtype": "float32", "some_future_field": [1, 2]}
    r = httpx.post(svc.url + "/classify", json={"input": text, "use_activation": False, **extras})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "classify-abc-1"
    assert r.json()["data"][0]["probs"] == pytest.approx(plain["data"][0]["probs"], abs=1e-6)
    # Without request_id, the X-Request-ID header names the reply (vLLM reads X-Request-Id).
    r = httpx.post(svc.url + "/classify", json={"input": text}, headers={"X-Request-ID": "trace-7"})
    assert r.json()["id"] == "classify-trace-7"


def test_truncation_side_right_keeps_the_first_tokens(svc, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["reward_pref"])
    text = "<|im_start|>user\n" + "a long question about bread " * 20 + "<|im_end|>\n<|im_start|>assistant\nok<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > MAX_TOKENS
    r = httpx.post(svc.url + "/classify", json={"input": ids})
    assert r.status_code == 400 and "maximum context length is 96" in r.json()["error"]["message"]

    def logit(body):
        r = httpx.post(svc.url + "/classify", json={**body, "use_activation": False})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["probs"][0], r.json()["usage"]["prompt_tokens"]

    head, n = logit({"input": text, "truncate_prompt_tokens": 20, "truncation_side": "right"})
    assert n == 20 and head == pytest.approx(logit({"input": ids[:20]})[0], abs=1e-5)
    assert logit({"input": ids, "truncate_prompt_tokens": 20, "truncation_side": "right"})[0] == pytest.approx(head, abs=1e-5)
    tail, _ = logit({"input": text, "truncate_prompt_tokens": 20})
    assert tail == pytest.approx(logit({"input": ids[-20:]})[0], abs=1e-5) and tail != pytest.approx(head, abs=1e-4)


# ---------------------------------------------------------------- the docs' custom reward function


def docs_reward_function() -> str:
    """The Python block of docs/reward_services.md that defines verl's compute_score."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if "def compute_score(" in b]
    return block


def test_docs_custom_reward_function_keeps_every_turn_through_verls_loader(svc, tiny_models, tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = tmp_path / "crs_reward.py"
    path.write_text(docs_reward_function())
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": str(path), "name": "compute_score", "reward_kwargs": {"url": svc.url}}}})
    reward_fn = get_custom_reward_fn(config)
    monkeypatch.setenv("CRS_API_KEY", KEY)
    # verl's dataset keeps the whole prompt conversation in extra_info when asked (the docs say how).
    got = reward_fn(data_source="oasst", solution_str=REPLY, ground_truth=None,
                    extra_info={"prompt": CONVERSATION, "index": 0})
    want = v1_score(svc, [*CONVERSATION, {"role": "assistant", "content": REPLY}])
    assert got == pytest.approx(want, abs=1e-5)
    # Only the last user turn would score something else: the earlier turns count.
    last_turn_only = v1_score(svc, [CONVERSATION[-1], {"role": "assistant", "content": REPLY}])
    assert got != pytest.approx(last_turn_only, abs=1e-4)
    # A plain-text prompt (the single-turn datasets) works too.
    single = reward_fn(data_source="oasst", solution_str=REPLY, ground_truth=None, extra_info={"prompt": "Hi"})
    assert single == pytest.approx(v1_score(svc, [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": REPLY}]), abs=1e-5)
    assert json.dumps(got)  # a plain float verl can log
    assert os.environ["CRS_API_KEY"] == KEY
