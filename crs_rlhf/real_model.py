"""The demo on a real pretrained model (`crs-rlhf demo --model smollm2-135m` or `--base PATH`).

What differs from the tiny run, and why:

* the base is imported once from the GGUF a package ships (crs_rlhf/import_gguf.py) and
  reused from `OUT/base/NAME` afterwards; `--base` takes any Hugging Face causal-LM folder;
* SFT is LoRA (r 8) merged into the weights, the reward models are LoRA + a fresh score
  head on the SFT backbone, all at the learning rates a pretrained model wants (the tiny
  run's 1e-3 .. 3e-3 would wreck it) and one pass over the fixture, so the whole demo fits
  the CPU budget;
* the two reward models train at the same time (the absolute one in a child process): each
  trainer uses one thread, so on two cores they overlap instead of queueing;
* PPO takes small batches of short answers on the LoRA, with two data-parallel learner
  workers of one thread each (the learner is the largest share of a step, and it runs while
  the services wait); its learning rate and step count are the measured choice in
  docs/real-model.md ("Choosing PPO's settings");
* "learning" is measured on held-out prompts, before vs after PPO (crs_rlhf/learning.py);
* the imported base also runs as a second policy_gen and judges PPO against SFT by
  logprobs: a weak judge (135M parameters) whose verdicts are still a real model's.

`StageClock` records each stage's wall time and the peak RSS summed over the demo's whole
process tree (services, Ray and its workers included), printed at the end and written to
`OUT/stages.json`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

REAL_MODELS = ("smollm2-135m",)

REAL_SFT = {"model": {"lora": True, "lora_r": 8, "lora_alpha": 16, "max_tokens": 512, "merge": True},
            "train": {"lr": 2e-4, "epochs": 1, "batch_size": 4}}
REAL_RM = {"model": {"lora": True, "lora_r": 8, "lora_alpha": 16, "max_tokens": 512, "min_prompt_tokens": 128},
           "train": {"lr": 1e-4, "epochs": 1}}
# PPO on the real model (measured, docs/real-model.md "Choosing PPO's settings"): lr 1e-3 made
# the policy babble within 3 steps (KL 12 by step 5); 1e-4 left the reward where it was.
# Two learner workers of one thread each: the update runs while the services wait, and two
# single-threaded processes keep their pace when other work shares the cores (one process on
# two threads took 403 s instead of 71 s for a step's learning under load).
REAL_PPO = {
    "optim": {"lr": 5.0e-4},
    "ppo": {"batch_size": 8, "ppo_epochs": 2, "num_minibatches": 2},
    "kl": {"init_coef": 0.05, "adaptive": True},
    "generation": {"max_prompt_tokens": 256, "max_new_tokens": 32},
    "ray": {"num_cpus": 2, "num_rollout_workers": 1},
    "learner": {"num_workers": 2},
    "run": {"checkpoint_every": 10, "prompts": {"held_out_fraction": 0.1}},
}
REAL_STEPS = 25  # measured: 10 steps left the held-out gain within noise (+0.02 ± 0.06), 25 moved it beyond (docs/real-model.md)
EVAL_MAX_TOKENS = 48
LEARNING_SAMPLES = 4  # completions per held-out prompt and policy in the learning measure (hf: ~1-4 s each on 2 cores)


def prepare_base(model: str | None, base: str | None, out: Path) -> Path:
    """The base model folder: `--base` as given, or `--model NAME` imported once under out/base/."""
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--base {base}: not a Hugging Face model folder (no config.json)")
        return path
    from crs_rlhf.import_gguf import import_gguf

    folder = out / "base" / str(model)
    if (folder / "import_gguf.json").is_file():
        print(f"  reusing {folder} (imported earlier)", flush=True)
        return folder
    if folder.exists():  # an import that died half-way: start it again
        import shutil

        shutil.rmtree(folder)
    return import_gguf(str(model), folder)


def real_models(base: Path) -> dict[str, Path]:
    """Before training, all three roles start from the one base (the RMs add a score head)."""
    return {"policy": base, "reward_pref": base, "reward_abs": base}


def merged(defaults: dict, override: dict) -> dict:
    """`override` on top of `defaults`, recursively (neither is changed)."""
    out = json.loads(json.dumps(defaults))
    for k, v in override.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tree_usage() -> tuple[int, dict[int, float]]:
    """RSS of this process and all its descendants (services, Ray's raylet and workers), and
    each one's CPU seconds (user + system) so far."""
    import psutil

    me = psutil.Process()
    rss, cpu = 0, {}
    for p in [me, *me.children(recursive=True)]:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, cpu


class StageClock:
    """Wall time per stage, the peak process-tree RSS seen during it and the CPU seconds the
    tree spent in it (sampled each second; a process that ends between samples loses its last
    second). CPU seconds do not grow when other work shares the machine; wall time does."""

    def __init__(self, interval_s: float = 1.0):
        self.stages: list[dict] = []
        self._current: dict | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._observe()

    def _observe(self) -> None:
        rss, cpu = tree_usage()
        with self._lock:
            cur = self._current
            if cur is not None:
                cur["peak_rss_bytes"] = max(cur["peak_rss_bytes"], rss)
                for pid, seconds in cpu.items():
                    cur["_cpu0"].setdefault(pid, 0.0)  # a process born in this stage counts from 0
                    cur["_cpu"][pid] = seconds

    def start(self, name: str) -> None:
        self.end()
        with self._lock:
            self._current = {"stage": name, "t0": time.monotonic(), "peak_rss_bytes": 0,
                             "_cpu0": tree_usage()[1], "_cpu": {}}
        self._observe()

    def end(self) -> None:
        self._observe()
        with self._lock:
            cur, self._current = self._current, None
        if cur is not None:
            cur["wall_s"] = round(time.monotonic() - cur.pop("t0"), 1)
            start, last = cur.pop("_cpu0"), cur.pop("_cpu")
            cur["cpu_s"] = round(sum(max(t - start.get(pid, 0.0), 0.0) for pid, t in last.items()), 1)
            self.stages.append(cur)

    def close(self) -> None:
        self.end()
        self._stop.set()

    def table(self) -> str:
        lines = [f"{'stage':32s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS GiB':>13s}"]
        for s in self.stages:
            lines.append(f"{s['stage'][:32]:32s} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s['peak_rss_bytes'] / 2**30:13.2f}")
        total = sum(s["wall_s"] for s in self.stages)
        cpu = sum(s["cpu_s"] for s in self.stages)
        peak = max((s["peak_rss_bytes"] for s in self.stages), default=0)
        lines.append(f"{'total':32s} {total:8.1f} {cpu:8.1f} {peak / 2**30:13.2f}")
        return "\n".join(lines)

    def write(self, path: Path, **extra) -> None:
        data = {"stages": self.stages, "total_wall_s": round(sum(s["wall_s"] for s in self.stages), 1),
                "total_cpu_s": round(sum(s["cpu_s"] for s in self.stages), 1),
                "peak_rss_bytes": max((s["peak_rss_bytes"] for s in self.stages), default=0), **extra}
        path.write_text(json.dumps(data, indent=2) + "\n")


def learning_measure(rows: list[dict]) -> dict:
    """What "learning" means in the demo: the mean CRS reward of the last quarter of PPO steps
    minus that of the first quarter (the rewards the policy was trained on, on fresh prompts)."""
    if not rows:
        return {"crs_first_quarter": None, "crs_last_quarter": None, "crs_gain": None}
    k = max(1, len(rows) // 4)
    first = sum(r["reward/crs"] for r in rows[:k]) / k
    last = sum(r["reward/crs"] for r in rows[-k:]) / k
    return {"crs_first_quarter": first, "crs_last_quarter": last, "crs_gain": last - first, "quarter_steps": k}
