"""PPO scale-out: step time and rollout tokens/s with 1 vs 2 policy_gen replicas and 1 vs 2 learner workers.

    python bench/ppo_scale.py [--steps 3] [--batch 16] [--new-tokens 32] [--backend hf] [--device auto]

Starts two policy_gen replicas and both reward services as real processes on loopback, then runs
the real trainer (`trainer.ppo.driver.train`, local Ray) four times on the same prompts and seed:

    replicas × learner workers = 1×1 (baseline), 2×1, 1×2, 2×2

and prints, per layout, the median over steps (the first step is dropped: it pays for warm-up)
of the step time, the rollout time, rollout tokens/s (response tokens / rollout wall time) and
the learner's update time, then each as a ratio against the 1×1 baseline run in this process:

    RESULT replicas2_rollout_tps=<x> learners2_learn_speedup=<y> both_step_speedup=<z>

On a 2-core CPU machine the replicas and workers share the same two cores, so expect ratios near
(or below) 1: the benchmark then shows the overhead of the machinery. The figures that matter come
from a GPU machine with one GPU per replica and per learner worker (`--device cuda`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

LAYOUTS = (("1x1", 1, 1), ("2x1", 2, 1), ("1x2", 1, 2), ("2x2", 2, 2))  # name, replicas, learner workers


def _median_after_first(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows[1:] if r.get(key) is not None] or [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _summarise(rows: list[dict], step_times: list[float]) -> dict:
    tps = [r["response_length/mean"] * r["_batch"] / r["time/rollout"] for r in rows if r.get("time/rollout")]
    return {
        "step_s": statistics.median(step_times[1:] or step_times),
        "rollout_s": _median_after_first(rows, "time/rollout"),
        "learn_s": _median_after_first(rows, "time/learn"),
        "rollout_tps": statistics.median(tps[1:] or tps) if tps else float("nan"),
    }


def run_layout(base: dict, root: Path, name: str, urls: list[str], workers: int) -> dict:
    import time

    from trainer.ppo.config import PPOConfig
    from trainer.ppo.driver import train

    cfg = PPOConfig.model_validate({
        **base,
        "services": {**base["services"], "policy_urls": urls},
        "learner": {"num_workers": workers},
        "run": {**base["run"], "output_dir": str(root / "runs" / name)},
    })
    marks = [time.perf_counter()]
    rows: list[dict] = []

    def on_step(row: dict) -> None:
        marks.append(time.perf_counter())
        rows.append({**row, "_batch": cfg.ppo.batch_size})

    summary = train(cfg, on_step=on_step)
    if summary.last_step != cfg.run.steps:
        raise RuntimeError(f"layout {name}: the run stopped at step {summary.last_step} of {cfg.run.steps}")
    step_times = [b - a for a, b in itertools.pairwise(marks)]
    return _summarise(rows, step_times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="policy_gen backend of both replicas")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="learner device: cuda puts one GPU under each learner worker (ray.learner_gpu)")
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="which of 1x1,2x1,1x2,2x2 to run (1x1 always runs)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up and is not counted)")

    import ray

    from services.common.process import ServiceProcess, free_port, python_module
    from crs_rlhf.local_services import QUIET_ENV
    from trainer.ppo.actors import init_ray
    from trainer.ppo.config import RaySection
    from crs_rlhf.tiny_models import make_tiny_models

    root = Path(tempfile.mkdtemp(prefix="bench-ppo-scale-"))
    models = make_tiny_models(root / "models", seed=0)
    (root / "runs").mkdir()
    policy_args = ["--backend", args.backend, "--model-path", str(models["policy"]), "--adapter-root",
                   str(root / "runs"), "--dtype", "float32", "--max-loras", "2"]
    specs = {
        "policy_gen_0": python_module("services.policy_gen", *policy_args),
        "policy_gen_1": python_module("services.policy_gen", *policy_args),
        "reward_pref": python_module("services.reward_pref", "--model-path", str(models["reward_pref"])),
        "reward_abs": python_module("services.reward_abs", "--model-path", str(models["reward_abs"])),
    }
    wanted = {"1x1"} | set(args.layouts.split(","))
    unknown = wanted - {name for name, _, _ in LAYOUTS}
    if unknown:
        ap.error(f"unknown layouts {sorted(unknown)}: choose from 1x1,2x1,1x2,2x2")
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, cmd in specs.items():
            port = free_port()
            procs[name] = ServiceProcess([*cmd, "--port", str(port)], port, env=QUIET_ENV, name=name,
                                         log_path=root / f"{name}.log", startup_timeout=600).start()
            stack.callback(procs[name].stop)
        for p in procs.values():
            p.wait_ready()
        # One local Ray cluster for all layouts (train() leaves a cluster it did not start running).
        # Logical CPUs: 2 learner workers take one each, whatever the machine has.
        init_ray(RaySection(num_cpus=4))
        stack.callback(ray.shutdown)
        base = {
            "model": {"policy_path": str(models["policy"])},
            "ppo": {"batch_size": args.batch, "num_minibatches": 4},
            "generation": {"max_new_tokens": args.new_tokens},
            "services": {"reward_pref_urls": [procs["reward_pref"].url], "reward_abs_urls": [procs["reward_abs"].url],
                         "max_concurrency": 8},
            "ray": {"num_rollout_workers": 2, "learner_gpu": "always" if args.device == "cuda" else
                    ("never" if args.device == "cpu" else "auto")},
            "run": {"steps": args.steps, "checkpoint_every": args.steps, "seed": 0, "tensorboard": False},
        }
        urls = [procs["policy_gen_0"].url, procs["policy_gen_1"].url]
        results = {}
        for name, replicas, workers in LAYOUTS:
            if name not in wanted:
                continue
            print(f"[bench] layout {name}: {replicas} policy_gen replica(s), {workers} learner worker(s)", flush=True)
            results[name] = run_layout(base, root, name, urls[:replicas], workers)

    base_r = results["1x1"]
    print(f"\n{'layout':8s} {'step s':>8s} {'rollout s':>10s} {'rollout tok/s':>14s} {'learn s':>8s}   vs 1x1: step  tok/s  learn")
    for name, r in results.items():
        print(f"{name:8s} {r['step_s']:8.2f} {r['rollout_s']:10.2f} {r['rollout_tps']:14.1f} {r['learn_s']:8.2f}   "
              f"{base_r['step_s'] / r['step_s']:11.2f}x {r['rollout_tps'] / base_r['rollout_tps']:5.2f}x "
              f"{base_r['learn_s'] / r['learn_s']:5.2f}x")
    parts = []
    if "2x1" in results:
        parts.append(f"replicas2_rollout_tps={results['2x1']['rollout_tps'] / base_r['rollout_tps']:.3f}")
    if "1x2" in results:
        parts.append(f"learners2_learn_speedup={base_r['learn_s'] / results['1x2']['learn_s']:.3f}")
    if "2x2" in results:
        parts.append(f"both_step_speedup={base_r['step_s'] / results['2x2']['step_s']:.3f}")
    print("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
