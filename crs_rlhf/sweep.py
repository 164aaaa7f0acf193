"""`crs-rlhf sweep`: a grid of PPO runs as concurrent trainers on ONE set of services.

    crs-rlhf sweep --config RUN.yaml --grid crs.weight=0,0.25,0.625,1 [--grid kl.init_coef=0.002,0.02]
                   --out DIR [--parallel K] [--set k=v ...] [--start-services --models MODELS] [--eval EVAL.yaml]

    1. grid             the cartesian product of every --grid, one run per point
    2. services         the config's URLs, or (--start-services) reward_pref, reward_abs and
                        policy_gen started on loopback, policy_gen with --max-loras K
    3. Ray              one cluster (the config's ray.address, or a local one) all trainers join
    4. runs             up to K `crs-rlhf train` processes at a time, DIR/runs/<name>/
    5. results          DIR/sweep.csv and overlay plots DIR/plots/*.png

Each run is its own process (its own logs, exit code and Ctrl-C checkpoint) joined to the
sweep's Ray cluster. A finished run leaves `sweep-done.json`; running the same command again
skips finished runs and resumes the others from their latest checkpoint, run by run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import itertools
import json
import logging
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config_io import ConfigError, dump_config, load_config
from trainer.ppo.checkpoint import latest_checkpoint
from trainer.ppo.metrics import read_jsonl

log = logging.getLogger("crs_rlhf.sweep")
SUMMARY_KEYS = ("reward/pref", "reward/abs", "reward/crs", "kl/objective", "kl/coef", "response_length/mean")
FINAL_WINDOW = 5  # sweep.csv's "final" values: means over the last 5 steps (1-step noise is large)


# --------------------------------------------------------------------------- grid (pure)


def parse_grid(specs: list[str]) -> list[dict]:
    """["crs.weight=0,0.25", "kl.init_coef=0.002,0.02"] -> 4 points {key: value}, first key slowest."""
    axes: list[tuple[str, list]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = [yaml.safe_load(v.strip()) for v in raw.split(",") if v.strip()]
        if not sep or not key or not values:
            raise ConfigError(f"--grid {spec!r} must look like key.sub=v1,v2 (e.g. --grid crs.weight=0,0.25,1)")
        if key in dict(axes):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        axes.append((key, values))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def run_name(point: dict) -> str:
    """{'crs.weight': 0.25, 'kl.init_coef': 0.02} -> 'weight-0.25_init_coef-0.02' (a folder name)."""
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts)) or "run"


def run_label(point: dict) -> str:
    """Legend text: 'w=0.25, β0=0.02'."""
    short = {"crs.weight": "w", "kl.init_coef": "β0"}
    return ", ".join(f"{short.get(k, k.split('.')[-1])}={v}" for k, v in point.items()) or "run"


def final_means(rows: list[dict], window: int = FINAL_WINDOW) -> dict:
    """Mean of each summary key over the last `window` rows (None where a signal is unused)."""
    tail = rows[-window:]
    out = {}
    for key in SUMMARY_KEYS:
        vals = [r[key] for r in tail if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    point: dict
    cfg: object  # PPOConfig of this run
    status: str = "pending"  # pending | done | skipped (already done) | failed | interrupted
    returncode: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def done_marker(self) -> Path:
        return self.dir / "sweep-done.json"

    def finished_before(self) -> bool:
        if not self.done_marker.is_file():
            return False
        return json.loads(self.done_marker.read_text()).get("steps") == self.cfg.run.steps


def build_runs(config: str | None, overrides: list[str], grid: list[dict], out: Path, extra: list[str]) -> list:
    """One validated PPOConfig per grid point (grid values win over --set; `extra` wins over both)."""
    from trainer.ppo.config import PPOConfig

    runs = []
    for point in grid:
        name = run_name(point)
        sets = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()), *extra,
                f"run.output_dir={(out / 'runs' / name).resolve()}"]
        runs.append(Run(name, point, load_config(PPOConfig, config, sets)))
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError("two grid points map to the same run folder; use distinct values")
    return runs


def _launch(run: Run, ray_address: str | None) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    cfg = run.cfg
    if ray_address is not None:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": ray_address})})
    path = run.dir / "sweep-run.yaml"
    dump_config(cfg, path)
    argv = [sys.executable, "-m", "crs_rlhf.cli", "train", "--config", str(path)]
    if latest_checkpoint(run.dir) is not None:
        argv.append("--resume")
    # Same process group as the sweep: a terminal's Ctrl-C reaches every trainer, and each
    # one checkpoints and exits 130 on its own.
    with open(run.dir / "train.log", "ab") as logf:
        run.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
    run.status = "running"


def _reap(run: Run) -> bool:
    if run.proc is None or run.proc.poll() is None:
        return False
    run.returncode = run.proc.returncode
    rows = read_jsonl(run.dir / "metrics.jsonl")
    if run.returncode == 0 and rows and rows[-1]["step"] == run.cfg.run.steps:
        run.status = "done"
        run.done_marker.write_text(json.dumps({"steps": run.cfg.run.steps, "point": run.point}))
    else:
        run.status = "interrupted" if run.returncode in (130, 143) else "failed"
        log.error("run %s ended with code %s; see %s", run.name, run.returncode, run.dir / "train.log")
    return True


def _steps_done(runs: list[Run]) -> int:
    total = 0
    for r in runs:
        rows = read_jsonl(r.dir / "metrics.jsonl") if r.status != "skipped" else []
        total += r.cfg.run.steps if r.status == "skipped" else (rows[-1]["step"] if rows else 0)
    return total


def execute(runs: list[Run], parallel: int, ray_address: str | None, poll_s: float = 1.0) -> None:
    """Up to `parallel` trainers at a time, with a progress bar over all runs' steps."""
    from tqdm import tqdm

    queue = [r for r in runs if r.status == "pending"]
    active: list[Run] = []
    with tqdm(total=sum(r.cfg.run.steps for r in runs), desc="sweep", unit="step") as bar:
        try:
            while queue or active:
                while queue and len(active) < parallel:
                    active.append(queue.pop(0))
                    _launch(active[-1], ray_address)
                active = [r for r in active if not _reap(r)]
                bar.n = _steps_done(runs)
                bar.set_postfix_str(" ".join(f"{r.name}:{r.status}" for r in runs if r.status != "pending"))
                bar.refresh()
                time.sleep(poll_s)
        except KeyboardInterrupt as stop:
            _stop_trainers(active, getattr(stop, "signum", signal.SIGINT))
            raise


def _stop_trainers(active: list[Run], signum: int, grace_s: float = 120.0) -> None:
    """Pass the sweep's SIGINT/SIGTERM on to its trainers and let them checkpoint (each exits
    130/143 on its own). A terminal's Ctrl-C reached them already (same process group; a second
    signal is ignored while they save), but `timeout`, CI runners and Kubernetes signal the
    sweep alone. A trainer still running after `grace_s` is killed."""
    for r in active:
        if r.proc is not None and r.proc.poll() is None:
            r.proc.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for r in active:
        if r.proc is None:
            continue
        try:
            r.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error("run %s did not stop within %.0fs of the signal; killing it", r.name, grace_s)
            r.proc.kill()
            r.proc.wait()
        _reap(r)


# --------------------------------------------------------------------------- results


def write_results(runs: list[Run], out: Path) -> tuple[Path, list[Path]]:
    keys = list(dict.fromkeys(k for r in runs for k in r.point))
    path = out / "sweep.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *keys, "status", "steps", *(f"final {k}" for k in SUMMARY_KEYS), "final_adapter", "run_dir"])
        for r in runs:
            rows = read_jsonl(r.dir / "metrics.jsonl")
            means = final_means(rows)
            steps = rows[-1]["step"] if rows else 0
            adapter = r.dir / "adapters" / f"step-{steps:06d}"
            w.writerow([r.name, *(r.point.get(k) for k in keys), r.status, steps,
                        *("" if means[k] is None else f"{means[k]:.6g}" for k in SUMMARY_KEYS),
                        str(adapter) if steps and adapter.is_dir() else "", str(r.dir)])
    return path, plot_overlays(runs, out / "plots")


def plot_overlays(runs: list[Run], out: Path) -> list[Path]:
    """One line per run: objective KL (thesis Fig. 22), rewards per signal, response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    data = [(run_label(r.point), read_jsonl(r.dir / "metrics.jsonl")) for r in runs]
    written = []

    def series(rows, key):
        pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def figure(name, panels, title):
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (key, ylabel) in zip(axes[0], panels):
            for label, rows in data:
                x, y = series(rows, key)
                if x:
                    ax.plot(x, y, label=label, marker="." if len(x) < 20 else None)
            ax.set(xlabel="step", ylabel=ylabel, title=key)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    figure("kl_objective.png", [("kl/objective", "objective KL (nats)")], "Objective KL per run")
    figure("reward.png", [("reward/crs", "CRS"), ("reward/pref", "preference RM logit"), ("reward/abs", "absolute RM logit")],
           "Mean reward per run")
    figure("response_length.png", [("response_length/mean", "tokens")], "Mean response length per run")
    return written


def eval_overrides(eval_config: str, runs: list[Run], out: Path, urls: dict[str, str]) -> list[str]:
    """`--set`s for `crs-rlhf eval run`: the runs' final adapters as policies (after the config's
    own, e.g. an SFT baseline), DIR/eval as out_dir, and the sweep's services when it started them."""
    data = yaml.safe_load(Path(eval_config).read_text()) or {}
    gen = data.get("generate") or {}
    policies = list(gen.get("policies") or [])
    for r in runs:
        rows = read_jsonl(r.dir / "metrics.jsonl")
        if rows:
            step = rows[-1]["step"]
            policies.append(f"{r.name}={r.dir / 'adapters' / f'step-{step:06d}'}")
    sets = [f"out_dir={out / 'eval'}", f"generate.policies={json.dumps(policies)}"]
    if "policy_gen" in urls:
        sets.append(f"generate.policy_url={urls['policy_gen']}")
    if data.get("rm_score") is not None:
        sets += [f"rm_score.{k}_url={urls['reward_' + k]}" for k in ("pref", "abs") if "reward_" + k in urls]
    return sets


def run_eval(eval_config: str, runs: list[Run], out: Path, urls: dict[str, str]) -> int:
    """Evaluate the final adapters against each other with `crs-rlhf eval run --config`."""
    argv = [sys.executable, "-m", "crs_rlhf.cli", "eval", "run", "--config", eval_config]
    for s in eval_overrides(eval_config, runs, out, urls):
        argv += ["--set", s]
    print("eval: " + " ".join(argv[3:]), flush=True)
    return subprocess.call(argv)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs-rlhf sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="the PPO run config every grid point starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="a grid axis (repeatable)")
    p.add_argument("--out", required=True, help="sweep folder: runs/<name>/, sweep.csv, plots/")
    p.add_argument("--parallel", type=int, default=None, help="trainers at once (default: the whole grid)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--start-services", action="store_true", help="start reward_pref, reward_abs, policy_gen on loopback")
    p.add_argument("--models", help="with --start-services: a folder with policy/, reward_pref/, reward_abs/")
    p.add_argument("--policy-backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--eval", dest="eval_config", help="evaluate the final adapters with `crs-rlhf eval run --config`")
    return p


def _models(path: str) -> dict[str, Path]:
    root = Path(path)
    models = {name: root / name for name in ("policy", "reward_pref", "reward_abs")}
    missing = [str(p) for p in models.values() if not p.is_dir()]
    if missing:
        raise ConfigError(f"--models {path}: missing {', '.join(missing)} (lay it out as `crs-rlhf make-tiny-models` does)")
    return models


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    try:
        if not args.grid:
            raise ConfigError("give at least one --grid, e.g. --grid crs.weight=0,0.25,0.625,1")
        if args.start_services and not args.models:
            raise ConfigError("--start-services needs --models DIR (policy/, reward_pref/, reward_abs/)")
        if args.eval_config and importlib.util.find_spec("evaluation.cli") is None:
            raise ConfigError("--eval needs the evaluation commands (evaluation/cli.py, `crs-rlhf eval run`), "
                              "which this install does not have; run the sweep without --eval")
        grid = parse_grid(args.grid)
        parallel = args.parallel or len(grid)
        if parallel < 1:
            raise ConfigError("--parallel must be at least 1")
        models = _models(args.models) if args.start_services else None
        # Service URLs are placeholders until the services run; validation needs them set.
        stub = ["services.policy_url=http://127.0.0.1:9", "services.reward_pref_urls=[http://127.0.0.1:9]",
                "services.reward_abs_urls=[http://127.0.0.1:9]", f"model.policy_path={models['policy']}"] if models else []
        runs = build_runs(args.config, args.overrides, grid, out, stub)
    except ConfigError as e:
        print(f"crs-rlhf sweep: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for r in runs:
        if r.finished_before():
            r.status = "skipped"
    todo = [r for r in runs if r.status == "pending"]
    print(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} finished before), {min(parallel, max(len(todo), 1))} at a time, in {out}")
    interrupted, eval_rc = False, 0
    from crs_rlhf.local_services import SignalStop

    # SIGTERM as Ctrl-C: trainers checkpoint, then the services and Ray started here are stopped.
    stop = SignalStop()
    try:
        with stop, contextlib.ExitStack() as stack:
            urls: dict[str, str] = {}
            if todo or (args.eval_config and models is not None):
                if models is not None:
                    from crs_rlhf.local_services import start_local_services

                    need_pref = any(r.cfg.crs.weight > 0 for r in runs)
                    need_abs = any(r.cfg.crs.weight < 1 for r in runs)
                    # Each trainer holds one adapter slot (unload, then load); 2 is policy_gen's default.
                    urls = start_local_services(stack, models, out, args.policy_backend, need_pref or bool(args.eval_config),
                                                need_abs or bool(args.eval_config), logs=out / "logs",
                                                max_loras=max(2, min(parallel, len(runs))))
                    svc = {"policy_urls": [urls["policy_gen"]], "reward_pref_urls": [urls["reward_pref"]] if "reward_pref" in urls else [],
                           "reward_abs_urls": [urls["reward_abs"]] if "reward_abs" in urls else []}
                    for r in todo:
                        r.cfg = r.cfg.model_copy(update={"services": r.cfg.services.model_copy(update=svc)})
            if todo:
                address = _ray_address(stack, todo, parallel)
                stop.install()  # ray.init replaced the SIGTERM handler with one that exits at once
                try:
                    execute(runs, parallel, address)
                except KeyboardInterrupt:
                    interrupted = True
            csv_path, pngs = write_results(runs, out)
            print(f"results: {csv_path}\nplots:   " + ", ".join(str(p) for p in pngs))
            ok = all(r.status in ("done", "skipped") for r in runs)
            if args.eval_config and ok and not interrupted:
                eval_rc = run_eval(args.eval_config, runs, out, urls)
    except KeyboardInterrupt:  # before the trainers ran (services starting): everything started is stopped
        print("interrupted: the services started here are stopped", file=sys.stderr)
        return stop.exit_code(130)
    if interrupted:
        print("interrupted: each run saved a checkpoint; the same command resumes the sweep")
        return stop.exit_code(130)
    return (eval_rc or 0) if ok else 1


def _ray_address(stack: contextlib.ExitStack, runs: list[Run], parallel: int) -> str | None:
    """The config's ray.address, or a local cluster started here for every trainer to join."""
    address = runs[0].cfg.ray.address
    if address:
        return address
    import ray

    from trainer.ppo.actors import init_ray
    from trainer.ppo.config import RaySection

    # One CPU per learner actor; rollout actors reserve none (see trainer/ppo/actors.py).
    if init_ray(RaySection(num_cpus=max(parallel, runs[0].cfg.ray.num_cpus or 1))):
        stack.callback(ray.shutdown)
    # An explicit address, never 'auto': other Ray clusters on this machine must not be joined.
    return ray.get_runtime_context().gcs_address


if __name__ == "__main__":
    sys.exit(main())
