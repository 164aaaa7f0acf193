"""The real trainer with `learner.num_workers: 2` against real services on loopback: steps run
on a two-worker learner group, rank 0 writes adapters and checkpoints, a learner worker killed
mid-run fails the CLI with the learner exit code naming the rank, and `--resume` continues
from the last checkpoint with two workers again."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from _support import Stack
from _support import metrics_rows as _rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory, ray_cluster):
    s = Stack(tiny_models, tmp_path_factory.mktemp("group-e2e"))
    yield s
    s.close()


def _kill_rank_when_checkpointed(run_dir, step: int, rank: int, killed: list[str]) -> threading.Thread:
    """Once checkpoint `step` is complete, kill learner worker `rank` of this run (its Ray actor)."""
    import ray

    from trainer.ppo.config import run_tag

    def go():
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == f"step-{step:06d}":
                names = [n if isinstance(n, str) else n["name"] for n in ray.util.list_named_actors()]
                mine = [n for n in names if n.startswith(run_tag(run_dir)) and n.endswith(f"-rank-{rank}")]
                if mine:
                    ray.kill(ray.get_actor(mine[-1]))
                    killed.append(mine[-1])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_two_workers_train_fail_loudly_and_resume(stack, tmp_path, capsys):
    from trainer.ppo.checkpoint import latest_checkpoint
    from trainer.ppo.cli import EXIT_LEARNER, main
    from trainer.ppo.driver import train

    cfg = stack.cfg("dp2", steps=3, checkpoint_every=2)
    cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_workers": 2, "collective_timeout_s": 60})})
    (tmp_path / "dp2.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    # Steps 1-2 on two workers; after checkpoint 2, rank 1 is killed: step 3 must fail loudly.
    killed: list[str] = []
    killer = _kill_rank_when_checkpointed(cfg.run_dir, 2, 1, killed)
    assert main(["--config", str(tmp_path / "dp2.yaml")]) == EXIT_LEARNER == 4
    killer.join(timeout=10)
    err = capsys.readouterr().err
    assert killed, "the worker was never found to kill"
    # One line from the CLI (Ray also forwards the workers' own log lines to this stderr).
    (line,) = [x for x in err.splitlines() if x.startswith("crs-rlhf train:")]
    assert "the learner failed: learner worker rank 1 (node " in line and line.endswith("(--resume)"), line

    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["learner/num_workers"] == 2 for r in rows)
    # Rank 0 wrote each step's adapter and the checkpoint (the other rank writes nothing).
    for k in (1, 2):
        assert (cfg.run_dir / "adapters" / f"step-{k:06d}" / "adapter_model.safetensors").is_file()
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None and ckpt.name == "step-000002"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "value_head.safetensors", "optimizer.pt", "rng.pt", "state.json"}

    # --resume: a fresh group of two restores the checkpoint on every rank and runs step 3.
    again = train(cfg, resume=True)
    assert (again.first_step, again.last_step) == (3, 3) and not again.interrupted
    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["learner/num_workers"] == 2
    assert [r["data/position"] for r in rows] == [4, 8, 12]
    # The resumed policy is the trained one: policy_gen (step 2's adapter) and the learner agree.
    assert rows[-1]["logprob_gap/mean"] < 1e-3
    assert latest_checkpoint(cfg.run_dir).name == "step-000003"
    import ray

    assert not [n for n in ray.util.list_named_actors() if "rank-" in str(n)], "the group was not shut down"
