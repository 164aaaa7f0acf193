"""Per-step metrics: RUN/metrics.jsonl (one JSON object per step), RUN/rollouts.jsonl
(per-sample scores, for the reward-distribution plots), TensorBoard, and optionally
Weights & Biases (`run.report_to: [wandb]`; WANDB_MODE=offline writes RUN/wandb/ only).

On resume the files are cut back to the checkpoint's step first: steps after the last
checkpoint are redone, and must appear once, not twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

REQUIRED = ("step", "reward/pref", "reward/abs", "reward/crs", "kl/objective", "kl/coef",
            "response_length/mean", "time/generate", "time/score", "time/learn", "time/sync",
            # policy_gen replicas holding the step's adapter / out of rotation after its sync, and
            # rollouts refused for a stale adapter version (trainer/ppo/policy_sync.py, experience.py)
            "policy/replicas_in_rotation", "policy/replicas_out", "rollouts/stale_dropped")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def require_wandb():
    """Import wandb or say how to get it: it is an optional extra, never a hard dependency."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("run.report_to includes 'wandb' but wandb is not installed: "
                           "pip install 'crs-rlhf[wandb]' (or remove wandb from run.report_to)") from None
    return wandb


def _start_wandb(run_dir: Path, project: str, config: dict | None, resume_step: int):
    wandb = require_wandb()
    # One W&B run per run folder (id from its name and path), so a resumed run continues it.
    run_id = "crs-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return wandb.init(project=project, name=run_dir.name, id=run_id, dir=str(run_dir), config=config or {},
                      resume="allow" if resume_step else None, reinit=True)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: int = 0,
                 wandb: bool = False, wandb_project: str = "crs-rlhf", config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rollouts_path = self.run_dir / "rollouts.jsonl"
        for p in (self.metrics_path, self.rollouts_path):
            if resume_step > 0:
                _truncate_jsonl(p, resume_step)
            elif p.exists():
                p.unlink()  # a fresh run in an old folder starts clean
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of redone steps from an interrupted run.
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.wandb_run = _start_wandb(self.run_dir, wandb_project, config, resume_step) if wandb else None

    @classmethod
    def for_run(cls, cfg, resume_step: int = 0) -> MetricsLogger:
        """The logger a PPOConfig asks for (run.tensorboard / run.report_to)."""
        r = cfg.run
        return cls(cfg.run_dir, tensorboard=r.tensorboard or "tensorboard" in r.report_to, resume_step=resume_step,
                   wandb="wandb" in r.report_to, wandb_project=r.wandb_project,
                   config=json.loads(cfg.model_dump_json()))

    def log(self, step: int, stats: dict, rollouts: dict | None = None) -> dict:
        """Append one step; missing signals (w = 0 or 1) are written as null."""
        row = {"step": step, **{k: None for k in REQUIRED if k != "step"}, **stats}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if rollouts is not None:
            with self.rollouts_path.open("a") as f:
                f.write(json.dumps({"step": step, **rollouts}) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb_run is not None:
            numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb_run.log(numeric, step=step)
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
