"""Time split of one PPO step on the tiny setup, and the gain from overlapping scoring with generation.

    python bench/ppo_step.py [--batch 16] [--new-tokens 32] [--concurrency 4] [--reps 3]
                             [--device cpu|cuda] [--precision auto|fp32|bf16] [--micro-batch-tokens N]
                             [--gradient-checkpointing] [--model-path DIR]

`--model-path`: a causal-LM folder (e.g. SmolLM2-135M from `crs-rlhf import-gguf`) as the policy
and as the backbone of both reward models (fresh random score heads: the timing does not depend
on what they say). Default: the tiny models.

Starts policy_gen (hf backend) and both reward services as real processes on loopback, then
in this process (no Ray, so only the rollout strategy differs):
  - rollouts with scoring on arrival (overlap) vs. all generation first, then all scoring
    (sequential), alternated `--reps` times on the same prompts and seeds;
  - one learner step (CRS → KL → GAE → PPO epochs) and one adapter save + sync, on `--device`
    with the learner's GPU knobs; the step's time is split into experience (the no-grad policy,
    reference and value forwards), update (the PPO epochs) and save (the adapter's safetensors).
`--concurrency` caps generation requests in flight, so completions arrive in waves as they
do from a busy server; with everything arriving at once there is nothing to overlap.
Prints `RESULT overlap_speedup=<x>`: median over back-to-back pairs of sequential/overlapped
rollout time (> 1: overlap is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from services.common.process import ServiceProcess, free_port, python_module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the learner's device")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="learner.precision")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="learner.micro_batch_tokens")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="learner.gradient_checkpointing")
    ap.add_argument("--model-path", help="causal LM folder for the policy and both RM backbones (default: tiny)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: torch sees no CUDA device here; run with --device cpu", file=sys.stderr)
            return 2

    from trainer.ppo.config import PPOConfig
    from trainer.ppo.driver import load_prompts
    from trainer.ppo.learner import Learner
    from trainer.ppo.policy_sync import sync_adapter
    from trainer.ppo.rollout import PromptItem, RolloutWorker
    from crs_rlhf.tiny_models import make_tiny_models

    root = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    models = make_tiny_models(root / "models", seed=0) if args.model_path is None else real_models(args.model_path, root)
    run = root / "run"
    (run / "adapters").mkdir(parents=True)
    argv_ = {
        "policy": python_module("services.policy_gen", "--backend", "hf", "--model-path", str(models["policy"]),
                                "--adapter-root", str(run)),
        "pref": python_module("services.reward_pref", "--model-path", str(models["reward_pref"])),
        "abs": python_module("services.reward_abs", "--model-path", str(models["reward_abs"])),
    }
    svcs = {}
    for name, a in argv_.items():
        port = free_port()
        svcs[name] = ServiceProcess([*a, "--port", str(port)], port, log_path=root / f"{name}.log", name=name).start()
    try:
        for s in svcs.values():
            s.wait_ready()
        cfg = PPOConfig.model_validate({
            "model": {"policy_path": str(models["policy"])},
            "ppo": {"batch_size": args.batch, "num_minibatches": 4},
            "generation": {"max_new_tokens": args.new_tokens},
            "services": {"policy_url": svcs["policy"].url, "reward_pref_urls": [svcs["pref"].url],
                         "reward_abs_urls": [svcs["abs"].url], "max_concurrency": args.concurrency},
            "learner": {"precision": args.precision, "micro_batch_tokens": args.micro_batch_tokens,
                        "gradient_checkpointing": args.gradient_checkpointing},
            "run": {"output_dir": str(run)},
        })
        prompts = load_prompts(cfg).prompts
        items = [PromptItem(i, prompts[i % len(prompts)]) for i in range(args.batch)]
        worker = RolloutWorker(cfg)
        for overlap in (False, True):  # warm-up: first batches, allocator, connection set-up
            worker.rollout(items, None, 0, overlap=overlap)
        times: dict[bool, list[float]] = {True: [], False: []}
        last = {}
        for _ in range(args.reps):
            for overlap in (False, True):
                t0 = time.perf_counter()
                last[overlap] = worker.rollout(items, None, 1, overlap=overlap)
                times[overlap].append(time.perf_counter() - t0)
        seq, ovl = statistics.median(times[False]), statistics.median(times[True])
        # Pairs run back to back share the machine's load of the moment: the median of the
        # per-pair ratios is steadier than a ratio of medians on a busy machine.
        speedup = statistics.median(s / o for s, o in zip(times[False], times[True]))
        batch, seq_batch = last[True], last[False]

        learner = Learner(cfg, device=args.device)
        learner.train_step(batch.samples)  # warm-up: CUDA context, kernels, allocator; its weights are discarded below
        learner = Learner(cfg, device=args.device)
        _sync_device(args.device)
        t0 = time.perf_counter()
        stats = learner.train_step(batch.samples)
        _sync_device(args.device)
        t_learn = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = learner.save_adapter(run / "adapters" / "step-000001")
        t_save = time.perf_counter() - t0
        sync_adapter(cfg, path, "bench-step-000001", None)
        t_sync = time.perf_counter() - t0
        peak = ""
        if args.device == "cuda":
            import torch

            peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"

        total = batch.time_total + t_learn + t_sync
        print(f"{'tiny' if args.model_path is None else args.model_path} PPO step: batch {args.batch}, {args.new_tokens} new tokens, {args.concurrency} generation requests in flight")
        print(f"  generate {batch.time_generate:6.2f}s  score (not hidden) {batch.time_score:6.2f}s  "
              f"learn {t_learn:6.2f}s  sync {t_sync:6.2f}s  total {total:6.2f}s  (sync share {t_sync / total:.1%})")
        print(f"  learner on {learner.device} ({args.precision} -> autocast {learner.autocast_dtype or 'off'}, "
              f"micro_batch_tokens {args.micro_batch_tokens}, checkpointing {args.gradient_checkpointing}){peak}")
        print(f"  learn split: experience {stats['time/experience']:.2f}s  update {stats['time/update']:.2f}s  "
              f"save {t_save:.2f}s  (PPO epochs {cfg.ppo.ppo_epochs} x {cfg.ppo.num_minibatches} minibatches; "
              f"kl/objective {stats['kl/objective']:.4f}, logprob gap {stats['logprob_gap/mean']:.2e})")
        print(f"  sequential mode split: generate {seq_batch.time_generate:.2f}s, then score {seq_batch.time_score:.2f}s")
        print(f"  rollout sequential (generate all, then score) median {seq:.2f}s; overlapped median {ovl:.2f}s "
              f"(runs: {[round(t, 2) for t in times[False]]} vs {[round(t, 2) for t in times[True]]})")
        hidden = 1 - batch.time_score / max(seq_batch.time_score, 1e-9)
        print(f"  scoring hidden behind generation: {100 * hidden:.0f}% "
              f"(upper bound on the gain here: {(seq_batch.time_generate + seq_batch.time_score) / seq_batch.time_generate:.2f}x)")
        print(f"RESULT overlap_speedup={speedup:.2f}")
        return 0
    finally:
        for s in svcs.values():
            s.stop()


def real_models(model_path: str, root: Path) -> dict[str, Path]:
    """The policy as given; two reward models = its backbone + a fresh num_labels=1 head each."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = {"policy": Path(model_path)}
    for i, name in enumerate(("reward_pref", "reward_abs")):
        torch.manual_seed(i)
        rm = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
        rm.config.pad_token_id = rm.config.eos_token_id
        rm.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(root / name)
        out[name] = root / name
    return out


def _sync_device(device: str) -> None:
    """CUDA runs asynchronously: wait for queued kernels so a timer measures the work."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


if __name__ == "__main__":
    from crs_rlhf.local_services import run_stoppable

    run_stoppable(main)  # SIGTERM stops the servers started here, as Ctrl-C does
