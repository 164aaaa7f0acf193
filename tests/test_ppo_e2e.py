"""PPO end to end: real policy_gen + two reward services over HTTP, real local Ray.

The reward is one a tiny random policy can chase within a dozen steps: a real Llama
sequence-classification model, built in the test, whose score is the share of tokens
containing the letter "e" (uniform attention over the conversation, a feature dimension in
the embeddings, a calibrated score head). It is served by the real reward services, so
everything between the policy and the score is the production path.
"""

from __future__ import annotations

import json
import math
import signal
import threading

import pytest
from _support import Stack
from _support import metrics_rows as _rows

from services.common.process import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory, ray_cluster):
    s = Stack(tiny_models, tmp_path_factory.mktemp("ppo-e2e"))
    yield s
    s.close()


def test_ppo_learns_to_chase_the_reward(stack):
    from crs_rlhf.plot import plot_run
    from trainer.ppo.driver import train
    from trainer.ppo.metrics import REQUIRED

    cfg = stack.cfg("learn", steps=12)
    summary = train(cfg)
    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13)) and summary.last_step == 12
    for key in (*REQUIRED, "loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "policy/entropy",
                "logprob_gap/mean"):
        assert all(r[key] is not None and math.isfinite(r[key]) for r in rows), key
    crs = [r["reward/crs"] for r in rows]
    first, last = sum(crs[:3]) / 3, sum(crs[-3:]) / 3
    print("reward/crs per step:", " ".join(f"{c:.2f}" for c in crs))
    assert last > first + 1.0, f"mean CRS reward did not rise: first {first:.3f}, last {last:.3f} ({crs})"
    assert all(abs(r["kl/objective"]) < 100 for r in rows)
    # Every rollout came from the current policy: policy_gen's logprobs == the learner's (CPU fp32).
    assert max(r["logprob_gap/mean"] for r in rows) < 1e-3
    assert all((cfg.run_dir / "adapters" / f"step-{k:06d}" / "adapter_model.safetensors").is_file() for k in range(1, 13))
    assert any((cfg.run_dir / "tensorboard").iterdir())
    assert {p.name for p in plot_run(cfg.run_dir)} == {"reward.png", "kl.png", "response_length.png", "reward_distribution.png"}


def test_reward_service_restart_mid_run_loses_no_step(stack):
    from trainer.ppo.driver import train

    cfg = stack.cfg("fault", steps=4)
    restarts: list[threading.Thread] = []

    def on_step(row):
        if row["step"] == 1:  # the pref service dies between steps and comes back ~1 s later
            restarts.append(stack.restart_later("pref", delay=1.0))

    summary = train(cfg, on_step=on_step)
    restarts[0].join()
    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not summary.interrupted
    assert rows[1]["retries/reward_pref"] > 0  # step 2 waited for the service
    samples = _rows(cfg.run_dir, "rollouts.jsonl")
    assert all(v is not None for s in samples for v in s["r_pref"] + s["r_abs"])
    assert [p for s in samples for p in s["positions"]] == list(range(4 * 4))  # 4 prompts x 2 samples per step; order continues across epochs


def test_ctrl_c_checkpoints_and_resume_continues(stack):
    from trainer.ppo.checkpoint import latest_checkpoint
    from trainer.ppo.driver import train

    cfg = stack.cfg("resume", steps=4, checkpoint_every=3)

    def ctrl_c_after_step_2(row):
        if row["step"] == 2:
            signal.raise_signal(signal.SIGINT)

    # As under a shell's `cmd &`, which starts the process with SIGINT ignored: the trainer
    # installs its own handler and must not depend on the inherited disposition.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        first = train(cfg, on_step=ctrl_c_after_step_2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert first.interrupted and first.last_step == 2
    assert latest_checkpoint(cfg.run_dir).name == "step-000002"  # saved by the Ctrl-C handler, not the schedule
    second = train(cfg, resume=True)
    assert (second.first_step, second.last_step) == (3, 4)
    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["data/position"] for r in rows] == [4, 8, 12, 16]
    positions = [p for s in _rows(cfg.run_dir, "rollouts.jsonl") for p in s["positions"]]
    assert positions == list(range(16))  # no prompt skipped or repeated
    state = json.loads((cfg.run_dir / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 16


def test_sigterm_checkpoints_like_ctrl_c_and_resume_auto_continues(stack):
    """Kubernetes eviction, `docker stop` and stopping a Ray job send SIGTERM, not SIGINT."""
    from trainer.ppo.checkpoint import latest_checkpoint
    from trainer.ppo.driver import train

    cfg = stack.cfg("sigterm", steps=3, checkpoint_every=5)

    def sigterm_after_step_1(row):
        if row["step"] == 1:
            signal.raise_signal(signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    first = train(cfg, on_step=sigterm_after_step_1)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored on the way out
    assert first.interrupted and first.last_step == 1 and first.exit_code == 143
    assert latest_checkpoint(cfg.run_dir).name == "step-000001"
    again = train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": "auto"})}))
    assert (again.first_step, again.last_step) == (2, 3)
    assert [r["step"] for r in _rows(cfg.run_dir)] == [1, 2, 3]


def test_policy_gen_restart_mid_run_resyncs_the_adapter_and_loses_no_step(stack):
    from trainer.ppo.driver import train

    cfg = stack.cfg("policy-restart", steps=3)
    restarts: list[threading.Thread] = []

    def on_step(row):
        if row["step"] == 1:  # policy_gen dies holding step 1's adapter; back ~1 s later without it
            restarts.append(stack.restart_later("policy", delay=1.0))

    summary = train(cfg, on_step=on_step)
    restarts[0].join()
    rows = _rows(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and not summary.interrupted
    # Step 2 was generated by step 1's adapter, re-loaded into the new process: the learner's
    # logprobs match policy_gen's (the base model's would not, after a step at lr 1e-2).
    assert max(r["logprob_gap/mean"] for r in rows) < 1e-3
    positions = [p for s in _rows(cfg.run_dir, "rollouts.jsonl") for p in s["positions"]]
    assert positions == list(range(12))


def test_trainer_started_before_its_services_waits_for_them(stack, caplog):
    from trainer.ppo.driver import train

    cfg = stack.cfg("late-services", steps=1)
    late = stack.restart_later("abs", delay=4.0)  # down now; up in ~4 s plus its load time
    with caplog.at_level("INFO", logger="crs_rlhf.wait"):
        summary = train(cfg)
    late.join()
    assert summary.last_step == 1
    assert any("waiting for reward_abs at" in r.getMessage() and "ready" in r.getMessage() for r in caplog.records)


def test_unused_signal_is_null_in_every_row(stack):
    from trainer.ppo.driver import train

    cfg = stack.cfg("w1", steps=1)
    cfg = cfg.model_copy(update={"crs": cfg.crs.model_copy(update={"weight": 1.0})})
    train(cfg)
    (row,) = _rows(cfg.run_dir)
    assert row["retries/reward_abs"] is None and row["reward/abs"] is None
    assert row["retries/reward_pref"] == 0


def test_cli_failures_print_one_line_and_a_documented_exit_code(stack, tmp_path, capsys):
    import yaml

    from trainer.ppo.cli import main

    down = stack.cfg("down", steps=1).model_dump(mode="json")
    down["services"].update(policy_url=f"http://127.0.0.1:{free_port()}")
    down["run"]["step_timeout_s"] = 1
    (tmp_path / "down.yaml").write_text(yaml.safe_dump(down))
    assert main(["--config", str(tmp_path / "down.yaml")]) == 3
    err = capsys.readouterr().err
    assert "policy_gen at http://127.0.0.1:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    outside = stack.cfg("outside", steps=1).model_dump(mode="json")
    outside["run"]["output_dir"] = str(tmp_path / "not-under-adapter-root")
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(outside))
    assert main(["--config", str(tmp_path / "outside.yaml")]) == 2
    err = capsys.readouterr().err
    assert "adapter-root" in err and "Traceback" not in err
