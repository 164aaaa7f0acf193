"""Reward scoring at the hardware limit: per-request vs padded-sorted vs packed (+compile) vs HTTP.

    python bench/reward_gpu.py --size 1b|8b [--device auto|cpu|cuda] [--packing auto|flex|sdpa|off]
                               [--compile] [--peak-tflops 790] [--items 512] [--no-http]

A random-weight Llama reward model built from a config (nothing downloaded; bf16 on CUDA,
fp32 on CPU) scores the same items (lengths 64-1024 tokens, ChatML-encoded by the reward
engine) up to six ways, each timed after its own warm-up:
  per_request     one item per forward (what naive serving does)
  sorted          the batcher's length-sorted, token-budget padded micro-batches
  packed          services.reward.packed_forward: FFD rows, block-diagonal mask
  packed_compile  the same with torch.compile of the backbone (fixed bucket shapes), --compile
  http            reward_pref as a real process on the model saved to a temp folder, 64 clients
                  sending one item per request, with `--packing on` and the packed modes' row
                  length, buckets and attention (`--packing off` here: the padded service)
  http_compile    the same service with `--compile` too (with --compile): what users get
                  with the GPU settings of docs/reward_gpu.md
HTTP services run one at a time after the in-process rounds (an 8B model per process).
Score drift is each mode's max |score - per_request score| (the bf16 bound; ~1e-6 in fp32).
The roofline is peak FLOP/s / (2 x non-embedding parameters) tokens/s (attention FLOPs are
not counted, so long rows can only fall below it). On CPU (`--device cpu` or no GPU) a tiny
model runs the same comparison; without --peak-tflops the RESULT line has ratios only.
Last line: `RESULT http_vs_roofline=<x> packed_vs_sorted=<y> ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/reward_gpu.py` from anywhere

# Llama 3.2 1B and Llama 3.1 8B shapes (public configs); "tiny" is for CPU runs.
SIZES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "rope_theta": 500000.0},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "rope_theta": 500000.0},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rope_theta": 500000.0},
}


MODES = ("per_request", "sorted", "packed", "packed_compile", "http", "http_compile")
HTTP_MODES = ("http", "http_compile")


@dataclass
class Mode:
    name: str
    tokens: int
    seconds: float
    scores: list[float] = field(repr=False, default_factory=list)
    note: str = ""
    drift_max: float = float("nan")  # max |score - per_request score|

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def build_model(size: str, device, dtype, pad_id: int, seed: int):
    """LlamaForSequenceClassification with random weights, created directly on the device."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, num_labels=1, pad_token_id=pad_id,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the serving dtype: an 8B fp32 copy would be 32 GB
    try:
        with torch.device(device):
            model = LlamaForSequenceClassification(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(name: str, device, rows, fn, note: str = "") -> Mode:
    sync(device)
    start = time.perf_counter()
    scores = fn(rows)
    sync(device)
    return Mode(name, sum(len(r) for r in rows), time.perf_counter() - start, scores, note)


def per_request(engine, bar):
    def run(rows):
        out = []
        for r in bar(rows, "per_request"):
            out += engine.score_ids([r])
        return out
    return run


def padded_sorted(engine, max_batch_tokens: int, max_padding: float, bar):
    from services.reward.batcher import plan_micro_batches

    def run(rows):
        scores = [0.0] * len(rows)
        for batch in bar(plan_micro_batches([len(r) for r in rows], max_batch_tokens, max_padding), "sorted"):
            for i, s in zip(batch, engine.score_ids([rows[i] for i in batch])):
                scores[i] = s
        return scores
    return run


def packed(scorer, name: str, bar):
    def run(rows):
        plan = scorer.plan([len(r) for r in rows])
        scores = [0.0] * len(rows)
        for row in bar(plan.rows, name):
            part = scorer.score_plan(rows, type(plan)((row,), plan.row_tokens, plan.buckets))
            for s in row.items:
                scores[s.index] = part[s.index]
        return scores
    return run


def save_model(model, tokenizer, tmp: Path, size: str) -> Path:
    path = tmp / f"random-llama-{size}"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def packed_layout(args, attention: str, device, max_tokens: int, compiled: bool) -> tuple[int, int]:
    """(row_tokens, bucket count) of a packed mode: the same for in-process and HTTP rows.
    Fewer buckets with compile or on CUDA: each one is a full compile at warm-up."""
    from services.reward.packed_forward import default_row_tokens

    row_tokens = args.row_tokens or default_row_tokens(attention, device, max_tokens)
    return row_tokens, args.buckets or (2 if compiled or device.type == "cuda" else 4)


def service_flags(args, attention: str, device, max_tokens: int, compiled: bool) -> list[str]:
    """reward_pref flags of an HTTP mode: packing on with the in-process packed layout."""
    if args.packing == "off":
        return ["--packing", "off"]
    row_tokens, buckets = packed_layout(args, attention, device, max_tokens, compiled)
    return ["--packing", "on", "--packing-attention", attention, "--row-tokens", str(row_tokens),
            "--packing-buckets", str(buckets), *(["--compile"] if compiled else [])]


def start_http(args, path: Path, device, tmp: Path, name: str, flags: list[str]):
    """Start reward_pref on the saved model as a real process (stopped by the caller)."""
    from services.common.process import ServiceProcess, free_port, python_module

    t0 = time.perf_counter()
    port = free_port()
    argv = python_module(
        "services.reward_pref", "--model-path", str(path), "--port", str(port), "--device", device.type,
        "--dtype", args.dtype_name, "--max-batch-tokens", str(args.max_batch_tokens),
        "--max-padding", str(args.max_padding), "--max-tokens", str(args.max_tokens), "--log-level", "info",
        *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []), *flags,
        *args.http_args.split(),
    )
    log = tmp / f"{name}.log"
    svc = ServiceProcess(argv, port, log_path=log, name="reward_pref", startup_timeout=900)
    try:
        svc.start().wait_ready()
    except Exception as exc:
        svc.stop()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"reward_pref did not start: {exc}\n--- service log tail ---\n{tail}") from exc
    warm = [line for line in log.read_text(errors="replace").splitlines() if "packed scoring on" in line]
    print(f"{name}: reward_pref {' '.join(flags)} ready in {time.perf_counter() - t0:.0f} s (load + warm-up)"
          + (f"; {warm[-1].split(': ', 1)[-1]}" if warm else ""), flush=True)
    return svc


def missing_service_packages() -> list[str]:
    return [m for m in ("fastapi", "uvicorn", "pydantic", "pydantic_settings", "prometheus_client", "httpx")
            if importlib.util.find_spec(m) is None]


def http_mode(args, svc, items):
    """64 clients, one item per request; scores for the drift column come from one big request."""
    from reward_throughput import fire

    def run(rows):
        m = asyncio.run(fire(svc.url, items, args.clients, None))
        run.note = f"{args.clients} clients, p50 {statistics.median(m.latencies) * 1000:.0f} ms"
        run.tokens, run.seconds = m.tokens, m.seconds
        if run.scores is None:
            run.scores = asyncio.run(_scores_in_order(svc.url, items))
        return run.scores

    run.scores = None

    asyncio.run(fire(svc.url, items[: args.clients], args.clients, None))  # warm the HTTP path
    return run


async def _scores_in_order(url: str, items: list[dict]) -> list[float]:
    """One request with every item, for the drift column (the timed run sends one item each)."""
    import httpx

    async with httpx.AsyncClient(timeout=900) as client:
        r = await client.post(url + "/v1/score", json={"items": items})
        r.raise_for_status()
        return r.json()["scores"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: 1b on CUDA, tiny on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--packing", default="auto", choices=["auto", "flex", "sdpa", "off"],
                   help="attention of the packed modes (auto: flex on CUDA, sdpa on CPU); off skips them")
    p.add_argument("--compile", action="store_true", help="also time packed + torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--row-tokens", type=int, default=None, help="packed row budget (default: 32768 flex/CUDA, 2048 CPU)")
    p.add_argument("--buckets", type=int, default=None, help="how many row lengths (default: 2 on CUDA or with "
                   "--compile: each is a compile at warm-up; 4 on CPU)")
    p.add_argument("--items", type=int, default=None, help="default: 512 on CUDA, 96 on CPU")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=2048, help="engine truncation limit")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="sorted mode (default: 65536 CUDA, 2048 CPU)")
    p.add_argument("--max-padding", type=float, default=None, help="sorted mode (default: 1.0 CUDA, 0.05 CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default 790 on CUDA: H100/H200)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurement")
    p.add_argument("--http-args", default="", help="extra reward_pref flags for the HTTP mode")
    p.add_argument("--modes", default=None, help=f"comma list from {','.join(MODES)} (default: all that the "
                   "other flags allow; packed_compile needs --compile or naming it here)")
    p.add_argument("--torch-threads", type=int, default=None, help="CPU intra-op threads (default 1 on CPU)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    p.add_argument("--plot", type=Path, default=None, help="bar chart of tokens/s per mode (PNG)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of all modes (default 1 CUDA, 2 CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from reward_throughput import make_items
    from tqdm import tqdm

    from services.reward.engine import EngineOptions, RewardEngine, resolve_device
    from services.reward.packed_forward import PackedScorer, PackingOptions, resolve_attention
    from services.reward.packing import default_buckets
    from crs_rlhf.tiny_models import build_tokenizer

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or ("1b" if cuda else "tiny")
    args.items = args.items or (512 if cuda else 96)
    args.max_batch_tokens = args.max_batch_tokens or (65536 if cuda else 2048)
    args.max_padding = args.max_padding if args.max_padding is not None else (1.0 if cuda else 0.05)
    args.torch_threads = args.torch_threads or (None if cuda else 1)
    args.dtype_name = "bfloat16" if cuda else "float32"
    args.rounds = args.rounds or (1 if cuda else 2)
    peak = args.peak_tflops or (790.0 if cuda else None)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    def bar(it, desc):
        return tqdm(it, desc=f"{desc:14s}", leave=False, disable=None, mininterval=1.0)

    tokenizer = build_tokenizer()  # only for ChatML text -> ids; the model's vocab is larger
    t0 = time.perf_counter()
    model = build_model(args.size, device, getattr(torch, args.dtype_name), tokenizer.pad_token_id, args.seed)
    n_params = non_embedding_params(model)
    roofline = peak * 1e12 / (2 * n_params) if peak else None
    engine = RewardEngine(model, tokenizer, EngineOptions(f"random-llama-{args.size}", max_tokens=args.max_tokens),
                          device)
    items = make_items(tokenizer, args.items, args.min_len, args.max_len, args.seed)
    # encode_pairs, not encode_items: no pydantic needed (GPU images often lack it).
    rows = [t.ids for t in engine.encode_pairs([engine.opts.chat.format_pair(it["prompt"], it["response"])
                                                for it in items])]
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device={gpu} size={args.size} non_embedding_params={n_params / 1e9:.3f}B dtype={args.dtype_name} "
          f"items={len(rows)} tokens={sum(map(len, rows))} (lengths {min(map(len, rows))}-{max(map(len, rows))}) "
          f"built in {time.perf_counter() - t0:.0f} s"
          + (f" roofline={roofline:,.0f} tok/s at {peak:.0f} TFLOP/s" if roofline else ""), flush=True)

    # Every mode is built and warmed up first, then all run in turn, round after round: on a
    # shared machine the load drifts, and alternating spreads the drift over all of them.
    runners: list[tuple[str, object, str]] = []
    warm = rows[:8]
    want = set(args.modes.split(",")) if args.modes else {
        "per_request", "sorted", *(() if args.packing == "off" else ("packed",)),
        *(("packed_compile",) if args.compile else ()), *(() if args.no_http else ("http",)),
        *(("http_compile",) if args.compile and not args.no_http and args.packing != "off" else ())}
    if want - set(MODES):
        raise SystemExit(f"--modes: unknown {sorted(want - set(MODES))}; choose from {','.join(MODES)}")
    if "per_request" in want:
        per_request(engine, lambda it, d: it)(warm)
        runners.append(("per_request", per_request(engine, bar), ""))
    if "sorted" in want:
        padded_sorted(engine, args.max_batch_tokens, args.max_padding, lambda it, d: it)(warm)
        runners.append(("sorted", padded_sorted(engine, args.max_batch_tokens, args.max_padding, bar),
                        f"budget {args.max_batch_tokens}, max_padding {args.max_padding}"))
    attention = resolve_attention("auto" if args.packing == "off" else args.packing, device)
    if want & {"packed", "packed_compile"}:
        for name, comp in [(n, n == "packed_compile") for n in ("packed", "packed_compile") if n in want]:
            row_tokens, count = packed_layout(args, attention, device, engine.max_tokens, comp)
            buckets = default_buckets(row_tokens, count=count)
            opts = PackingOptions(row_tokens=row_tokens, buckets=buckets, attention=attention, compile=comp,
                                  compile_mode=args.compile_mode)
            scorer = PackedScorer(model, pad_id=engine.pad_id, max_tokens=engine.max_tokens, options=opts)
            warm_s = scorer.warmup()
            plan = scorer.plan([len(r) for r in rows])
            note = (f"{attention}, rows of {row_tokens}, buckets {buckets}, {len(plan.rows)} rows, "
                    f"fill {plan.fill:.3f}, warm-up {warm_s:.0f} s")
            print(f"{name}: {note}", flush=True)
            runners.append((name, packed(scorer, name, bar), note))

    def measure(name, fn, note, parts):
        m = timed(name, device, rows, fn, note)
        if name in HTTP_MODES:  # timed over the 64-client run only, not the drift request
            m.tokens, m.seconds, m.note = fn.tokens, fn.seconds, fn.note
        parts.setdefault(name, []).append(m)
        print(f"  {name}: {m.tokens_per_s:,.0f} tok/s ({m.tokens} tokens in {m.seconds:.1f} s)", flush=True)

    parts: dict[str, list[Mode]] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        for name, fn, note in runners:
            measure(name, fn, note, parts)
    http_modes = [n for n in HTTP_MODES if n in want]
    missing = missing_service_packages() if http_modes else []
    if missing:
        print(f"http: skipped, the service needs {', '.join(missing)} (not importable here); "
              "carry their wheels (bench/gpu_check.sh says how) for the HTTP figure", flush=True)
    if http_modes and not missing:
        with tempfile.TemporaryDirectory(prefix="crs-reward-gpu-") as tmp_dir:
            tmp = Path(tmp_dir)
            path = save_model(model, tokenizer, tmp, args.size)
            for name in http_modes:  # one service process at a time
                flags = service_flags(args, attention, device, engine.max_tokens, name == "http_compile")
                svc = start_http(args, path, device, tmp, name, flags)
                try:
                    fn = http_mode(args, svc, items)
                    for _ in range(args.rounds):
                        measure(name, fn, "", parts)
                finally:
                    svc.stop()
    modes = [Mode(n, sum(m.tokens for m in ps), sum(m.seconds for m in ps), ps[0].scores, ps[-1].note)
             for n, ps in parts.items()]

    # Drift against batch-1 scores (per_request); against sorted when per_request did not run.
    named = {m.name: m for m in modes}
    base = named.get("per_request") or named.get("sorted")
    for m in modes:
        if base is not None and m.scores:
            m.drift_max = max(abs(a - b) for a, b in zip(m.scores, base.scores))
    print(f"\n{'mode':15s} {'tokens/s':>12s} {'vs roofline':>12s} {'drift max':>10s}  note")
    for m in modes:
        vs = f"{m.tokens_per_s / roofline:12.3f}" if roofline else f"{'-':>12s}"
        print(f"{m.name:15s} {m.tokens_per_s:12,.0f} {vs} {m.drift_max:10.2e}  {m.note}")
    spread = statistics.pstdev(base.scores) if base is not None and len(base.scores) > 1 else float("nan")
    print(f"(drift is against {base.name if base else '-'} scores, whose standard deviation is {spread:.3g})")

    by = {m.name: m.tokens_per_s for m in modes}
    # Always first and always present: the best HTTP figure (what users get with the best
    # settings run); nan when there is no peak (CPU) or no HTTP run.
    best_http = max((by[k] for k in HTTP_MODES if k in by), default=None)
    ratios = {"http_vs_roofline": best_http / roofline if best_http and roofline else float("nan")}
    best = max((v for k, v in by.items() if k not in HTTP_MODES), default=float("nan"))
    for k in ("packed", "packed_compile"):
        if k in by and "sorted" in by:
            ratios[f"{k}_vs_sorted"] = by[k] / by["sorted"]
    if "per_request" in by and "sorted" in by:
        ratios["sorted_vs_per_request"] = by["sorted"] / by["per_request"]
    for http, inproc in (("http", "packed" if args.packing != "off" else "sorted"), ("http_compile", "packed_compile")):
        if http in by and inproc in by:
            ratios[f"{http}_vs_{inproc}"] = by[http] / by[inproc]
    if best_http:
        ratios["http_vs_best_in_process"] = best_http / best
    if roofline:
        ratios["best_in_process_vs_roofline"] = best / roofline
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": gpu, "size": args.size, "non_embedding_params": n_params, "peak_tflops": peak,
            "roofline_tokens_per_s": roofline, "score_std": spread, "items": len(rows), "tokens": sum(map(len, rows)),
            "modes": [{**{k: v for k, v in asdict(m).items() if k != "scores"}, "tokens_per_s": m.tokens_per_s}
                      for m in modes], "ratios": ratios}, indent=2))
    if args.plot and importlib.util.find_spec("matplotlib") is not None:
        plot(args.plot, modes, roofline, f"{args.size} RM on {gpu}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    return 0


def plot(path: Path, modes: list[Mode], roofline: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([m.name for m in modes], [m.tokens_per_s for m in modes], color="tab:blue")
    if roofline:
        ax.axvline(roofline, color="tab:red", ls="--", label=f"roofline {roofline:,.0f} tok/s")
        ax.legend(loc="lower right")
    ax.set_xlabel("tokens/s")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    from crs_rlhf.local_services import run_stoppable

    run_stoppable(main)  # SIGTERM stops the servers started here, as Ctrl-C does
