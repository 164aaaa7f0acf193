"""Processes we start are processes we stop: SIGTERM (as `timeout`, a CI runner or Kubernetes
sends it, to the command alone) and SIGINT stop everything a command started, then it exits
143 / 130. The end-to-end tests signal a real `crs-rlhf sweep --start-services`, a real
`crs-rlhf demo` and a benchmark mid-run and then look for every process each had started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from crs_rlhf.local_services import SignalStop
from trainer.ppo.signals import Interrupted

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"^\s+(reward_pref|reward_abs|policy_gen)\s+(http://127\.0\.0\.1:\d+)", re.MULTILINE)


def test_signal_stop_raises_once_and_gives_the_shell_code():
    with SignalStop() as stop:
        assert stop.exit_code(0) == 0
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, in the main thread
        assert info.value.signum == signal.SIGTERM and stop.exit_code(130) == 143
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: noted, not raised
        time.sleep(0.05)
        assert stop.exit_code(130) == 143
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # the caller's handlers are back
    with SignalStop() as stop:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C reads the same: an ExitStack unwinds on it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert stop.exit_code(0) == 130


def start(argv: list[str], log: Path) -> subprocess.Popen:
    # Its own session: the SIGTERM below reaches the command alone, as `timeout` or the kubelet send it.
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            trainers = "".join(f"\n--- {p}\n{p.read_text()[-2500:]}" for p in log.parent.rglob("train.log"))
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{log.read_text()[-2000:]}{trainers}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def steps_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def terminate_and_check(proc: subprocess.Popen, log: Path, started: list[psutil.Process], urls: list[str],
                        at_least: int = 3) -> None:
    assert len(started) >= at_least, started  # at least the services
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a stray tree behind a failed test
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    deadline = time.monotonic() + 20  # Ray's processes may take a moment after ray.shutdown
    while time.monotonic() < deadline and not all(gone(p) for p in started):
        time.sleep(0.5)
    left = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in started if not gone(p)]
    for p in started:  # clean up before failing, so one failure does not starve the suite
        if not gone(p):
            p.kill()
    assert rc == 143, f"exit {rc}, left running: {left}\n{text[-4000:]}"
    assert not left, f"left running after SIGTERM: {left}\n{text[-3000:]}"
    for url in urls:
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)


@pytest.mark.slow
def test_sigterm_to_a_sweep_mid_run_stops_trainers_services_and_ray(tiny_models, tmp_path):
    out, log = tmp_path / "sweep", tmp_path / "sweep.log"
    models = Path(tiny_models["policy"]).parent
    argv = [sys.executable, "-m", "crs_rlhf.cli", "sweep", "--config", str(ROOT / "configs" / "tiny" / "ppo.yaml"),
            "--grid", "crs.weight=0.25", "--out", str(out), "--start-services", "--models", str(models),
            "--set", "run.steps=200", "--set", "run.checkpoint_every=100", "--set", "ppo.batch_size=4",
            "--set", "ppo.num_minibatches=2", "--set", "generation.max_new_tokens=8"]
    proc = start(argv, log)
    wait_for("a PPO step", lambda: any(steps_done(m) >= 1 for m in out.glob("runs/*/metrics.jsonl")), proc, log)
    started = descendants(proc.pid)
    names = " ".join(" ".join(p.cmdline()) for p in started if not gone(p))
    assert "services.policy_gen" in names and "crs_rlhf.cli train" in names and "raylet" in names, names
    urls = [u for _, u in URL_LINE.findall(log.read_text())]
    assert len(urls) == 3
    terminate_and_check(proc, log, started, urls)
    # The trainers got the signal too and saved where they were: the same command resumes.
    for run in (out / "runs").iterdir():
        if steps_done(run / "metrics.jsonl"):
            assert any((run / "checkpoints").iterdir()), (run / "train.log").read_text()[-2000:]
    assert "the same command resumes the sweep" in log.read_text()


@pytest.mark.slow
def test_sigterm_to_the_demo_mid_run_stops_everything(tmp_path):
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    argv = [sys.executable, "-m", "crs_rlhf.cli", "demo", "--out", str(out), "--steps", "200", "--no-train"]
    proc = start(argv, log)
    wait_for("a PPO step", lambda: steps_done(out / "ppo" / "metrics.jsonl") >= 1, proc, log)
    started = descendants(proc.pid)
    urls = [u for _, u in URL_LINE.findall(log.read_text())]
    assert len(urls) == 3
    terminate_and_check(proc, log, started, urls)
    assert "interrupted after step" in log.read_text()


@pytest.mark.slow
def test_sigterm_while_the_services_start_stops_them(tiny_models, tmp_path):
    """The signal can come before any trainer runs: the services being started go too."""
    out, log = tmp_path / "sweep", tmp_path / "sweep.log"
    argv = [sys.executable, "-m", "crs_rlhf.cli", "sweep", "--config", str(ROOT / "configs" / "tiny" / "ppo.yaml"),
            "--grid", "crs.weight=0.25", "--out", str(out), "--start-services",
            "--models", str(Path(tiny_models["policy"]).parent), "--set", "run.steps=2"]
    proc = start(argv, log)
    wait_for("the services", lambda: len([p for p in descendants(proc.pid) if "services." in " ".join(p.cmdline())]) >= 3,
             proc, log, timeout=120)
    started = descendants(proc.pid)
    terminate_and_check(proc, log, started, [])
    assert "the services started here are stopped" in log.read_text()


def test_sigterm_to_a_benchmark_stops_the_servers_it_started(tmp_path):
    """A benchmark killed by `timeout` or a CI runner once left its server running (bench/fairness.py)."""
    log = tmp_path / "bench.log"
    argv = [sys.executable, str(ROOT / "bench" / "fairness.py"), "--service", "reward_abs", "--light", "2000"]
    proc = start(argv, log)
    wait_for("the reward_abs server", lambda: any("services.reward_abs" in " ".join(p.cmdline())
                                                  for p in descendants(proc.pid) if not gone(p)), proc, log, timeout=300)
    terminate_and_check(proc, log, descendants(proc.pid), [], at_least=1)
