"""Fairness between runs on a shared server: a light run's latency while a heavy run saturates it.

    python bench/fairness.py [--service reward_abs|policy_gen|both] [--light 40] [--seconds 20]

For each service, two server processes on loopback with tiny models, one after the other:
  fair  as shipped: a queue per run (X-CRS-Run), fair shares of each batch;
  fifo  the same server with --fair-scheduling false: one first-in-first-out queue (the
        baseline, in the same run, so the ratios are not skewed by the machine's load).
Each is measured twice: the light run alone (sequential small requests), then the same
light run while two heavy clients keep the server saturated with large requests.
  reward_abs  heavy: --heavy-items (128) items x ~900 tokens per request; light: 1 item of ~60 tokens;
  policy_gen  heavy: chat, n=16, 96 new tokens per sequence (ignore_eos); light: 4 new tokens.
Figures per mode: light p95 alone, light p95 under load, their ratio (goal <= 3 with fair),
and the throughput of all work (items or tokens per second) under the mix. Last line:
`RESULT <service>_p95_ratio_fair=<x> <service>_p95_ratio_fifo=<y> <service>_throughput_fair_vs_fifo=<z> ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _serving_support import metric  # the /metrics reader the tests use

from services.common.process import ServiceProcess, free_port, python_module

WORDS = "the model answer question because people often write short clear helpful replies about science".split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


@dataclass
class Workload:
    """What one service's heavy and light runs send."""

    path: str
    heavy: dict
    light: dict
    counter: str  # the server's /metrics counter of work done (items scored, tokens generated)


def reward_workload(rng: random.Random, heavy_items: int) -> Workload:
    heavy_items = [{"prompt": text(rng, 40), "response": text(rng, 800)} for _ in range(heavy_items)]
    light_items = [{"prompt": text(rng, 10), "response": text(rng, 40)}]
    return Workload("/v1/score", {"items": heavy_items}, {"items": light_items}, "crs_items_scored_total")


def policy_workload(rng: random.Random) -> Workload:
    heavy = {"messages": [{"role": "user", "content": text(rng, 20)}], "n": 16, "max_tokens": 96, "ignore_eos": True}
    light = {"prompt": text(rng, 8), "max_tokens": 4, "ignore_eos": True}
    return Workload("/v1/chat/completions", heavy, light, "policy_gen_generated_tokens_total")


async def light_latencies(client: httpx.AsyncClient, w: Workload, count: int) -> list[float]:
    path = "/v1/completions" if w.path == "/v1/chat/completions" else w.path
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        r = await client.post(path, json=w.light, headers={"X-CRS-Run": "light"})
        r.raise_for_status()
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    return out


async def measure(url: str, w: Workload, light: int, heavy_clients: int, seconds: float) -> tuple[float, float, float]:
    """(light p95 alone, light p95 under load, units/s of all work under load).

    Throughput is the server's own counter of work done over a fixed window of `seconds` from
    when the light run starts, the same in both modes. (Counting the heavy requests that
    finished inside the light run's span instead was skewed by whole requests: fair mode's
    span is a few seconds, about one heavy request, and read as 0.8 of FIFO's.)"""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await light_latencies(client, w, 3)  # warm-up
        alone = p95(await light_latencies(client, w, light))
        stop = asyncio.Event()

        async def heavy() -> None:
            while not stop.is_set():
                r = await client.post(w.path, json=w.heavy, headers={"X-CRS-Run": "heavy"})
                r.raise_for_status()

        tasks = [asyncio.create_task(heavy()) for _ in range(heavy_clients)]
        await asyncio.sleep(3.0)  # let the heavy run fill the queue first
        t0, done0 = time.perf_counter(), await asyncio.to_thread(metric, url, w.counter)
        loaded = p95(await light_latencies(client, w, light))
        await asyncio.sleep(max(0.0, t0 + seconds - time.perf_counter()))
        rate = (await asyncio.to_thread(metric, url, w.counter) - done0) / (time.perf_counter() - t0)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return alone, loaded, rate


def serve_argv(service: str, models: dict[str, Path], port: int, fair: bool) -> list[str]:
    flag = [] if fair else ["--fair-scheduling", "false"]
    if service == "reward_abs":
        return python_module("services.reward_abs", "--model-path", str(models["reward_abs"]), "--port", str(port),
                             "--max-tokens", "1024", "--log-level", "warning", *flag)
    return python_module("services.policy_gen", "--backend", "hf", "--model-path", str(models["policy"]),
                         "--port", str(port), "--max-model-len", "512", "--log-level", "warning", *flag)


def run_service(service: str, models: dict[str, Path], log_dir: Path, light: int, heavy_clients: int,
                heavy_items: int, seconds: float) -> dict:
    rng = random.Random(0)
    w = reward_workload(rng, heavy_items) if service == "reward_abs" else policy_workload(rng)
    figures = {}
    for mode in ("fair", "fifo"):
        port = free_port()
        argv = serve_argv(service, models, port, fair=mode == "fair")
        with ServiceProcess(argv, port, log_path=log_dir / f"{service}-{mode}.log", startup_timeout=600, name=service) as svc:
            alone, loaded, rate = asyncio.run(measure(svc.url, w, light, heavy_clients, seconds))
        figures[mode] = (alone, loaded, rate)
        unit = "items/s" if service == "reward_abs" else "tokens/s"
        print(f"{service:10s} {mode}: light p95 alone {alone * 1000:8.1f} ms, under load {loaded * 1000:9.1f} ms, "
              f"ratio {loaded / alone:7.1f}; throughput {rate:8.1f} {unit}", flush=True)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--service", choices=["reward_abs", "policy_gen", "both"], default="both")
    ap.add_argument("--light", type=int, default=40, help="light requests per measurement")
    ap.add_argument("--heavy-clients", type=int, default=2)
    ap.add_argument("--heavy-items", type=int, default=128, help="reward_abs: items per heavy request")
    ap.add_argument("--seconds", type=float, default=20.0, help="throughput window (at least the light run's span)")
    args = ap.parse_args()
    from crs_rlhf.tiny_models import make_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        models = make_tiny_models(Path(tmp) / "models", seed=0)
        services = ["reward_abs", "policy_gen"] if args.service == "both" else [args.service]
        result = []
        for service in services:
            f = run_service(service, models, Path(tmp), args.light, args.heavy_clients, args.heavy_items, args.seconds)
            ratio = {m: f[m][1] / f[m][0] for m in f}
            result += [f"{service}_p95_ratio_fair={ratio['fair']:.2f}", f"{service}_p95_ratio_fifo={ratio['fifo']:.2f}",
                       f"{service}_throughput_fair_vs_fifo={f['fair'][2] / f['fifo'][2]:.2f}"]
        print("RESULT " + " ".join(result))


if __name__ == "__main__":
    from crs_rlhf.local_services import run_stoppable

    run_stoppable(main)  # SIGTERM stops the servers started here, as Ctrl-C does
