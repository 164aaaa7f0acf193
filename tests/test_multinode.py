"""The trainer on a real two-node Ray cluster (tests/_two_node_ray.py: a head, and a raylet on
127.0.0.2 with its own temp dir, one CPU each), driven as a user would: `crs-rlhf train` with
`RAY_ADDRESS` set, a learner group of two workers (one per node), real services on loopback.

- kill the learner worker on node B mid-run: exit 4 naming its rank, node and pid; the failed
  run frees its policy_gen adapter slot, so a second run on the same policy_gen (one slot,
  `--max-loras 1`) trains instead of waiting for the slot and failing;
- gloo binds to the interface that holds each node's Ray IP (not what the hostname says);
- `RAY_ADDRESS` alone joins the cluster; a placement that cannot happen is logged and bounded;
- a hung node (SIGSTOP): the rank on it is named, not the healthy rank blocked in the all-reduce;
- node B's raylet killed mid-step: the rank on it is named; a `--resume` placement while it is
  still lost waits, logging the lost node, and fails naming it;
- a node with a rollout worker lost mid-rollout: the worker restarts on the head, the step's
  rollout is redone and the run goes on (exit 0).

Node B is lost for good by the hung-node test; each test after it joins a new node B.
`-s` prints the measured seconds (docs/scaling.md, failure table).

The drivers are subprocesses: the cluster runs without token auth (so node B is admitted),
and a driver must agree with it on RAY_AUTH_MODE, which Ray reads when it is imported.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from _two_node_ray import NODE_B_IP, TwoNodeCluster, learner_driver, rank_on_node_b, send_second_step

from services.common.process import ServiceProcess, free_port, python_module

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's node-failure detection made quick (default: tens of seconds), so the hung-node case
    # is decided well inside its collective timeout.
    c = TwoNodeCluster(tmp_path_factory.mktemp("two-node"), extra_env={
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3"})
    yield c
    c.close()


@pytest.fixture(scope="module")
def services(tiny_models, tmp_path_factory):
    """policy_gen with ONE adapter slot, and the preference RM (the runs use crs.weight 1)."""
    root = tmp_path_factory.mktemp("mn-services")
    runs = root / "runs"
    runs.mkdir()
    procs = {
        "policy": ServiceProcess([*python_module("services.policy_gen", "--backend", "hf", "--model-path",
                                                 str(tiny_models["policy"]), "--adapter-root", str(runs),
                                                 "--max-loras", "1"), "--port", str(p := free_port())], p,
                                 log_path=root / "policy.log", startup_timeout=240, name="policy_gen"),
        "pref": ServiceProcess([*python_module("services.reward_pref", "--model-path", str(tiny_models["reward_pref"])),
                                "--port", str(q := free_port())], q, log_path=root / "pref.log", startup_timeout=240,
                               name="reward_pref"),
    }
    for svc in procs.values():
        svc.start()
    try:
        for svc in procs.values():
            svc.wait_ready()
        yield {"runs": runs, "policy": procs["policy"].url, "pref": procs["pref"].url, "pref_pid": procs["pref"].proc.pid}
    finally:
        for svc in procs.values():
            svc.stop()


def _config(tiny_models, services, run: str, **run_over) -> dict:
    return {
        "model": {"policy_path": str(tiny_models["policy"])},
        "optim": {"lr": 1e-3},
        "ppo": {"batch_size": 4, "completions_per_prompt": 2, "num_minibatches": 2, "ppo_epochs": 1},
        "generation": {"max_new_tokens": 8, "max_prompt_tokens": 128},
        "crs": {"weight": 1.0},
        "services": {"policy_url": services["policy"], "reward_pref_urls": [services["pref"]], "timeout_s": 30},
        "ray": {"num_rollout_workers": 1, "learner_gpu": "never"},
        "learner": {"num_workers": 2, "collective_timeout_s": 60},
        "run": {"output_dir": str(services["runs"] / run), "steps": 3, "checkpoint_every": 1, "keep_adapters": None,
                "tensorboard": False, "step_timeout_s": 60, **run_over},
    }


class Train:
    """`crs-rlhf train` as a subprocess on the cluster; its stderr is read as it comes."""

    def __init__(self, cluster: TwoNodeCluster, cfg: dict, tmp: Path, *extra: str):
        path = tmp / f"{Path(cfg['run']['output_dir']).name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crs_rlhf.cli", "train", "--config", str(path), *extra], cwd=REPO,
            env=cluster.env(PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self._reader.start()

    def wait(self, timeout: float = 420) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the trainer hung:\n" + "".join(self.lines[-40:])) from None
        self._reader.join(timeout=10)
        return code

    def group_line(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := [x for x in list(self.lines) if "learner group: 2 workers" in x]:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("no learner group line:\n" + "".join(self.lines[-40:]))

    def cli_line(self) -> str:
        (line,) = [x.strip() for x in self.lines if x.startswith("crs-rlhf train:")]
        return line


def _ranks(group_line: str) -> dict[int, dict]:
    return {int(r): {"ip": ip, "pid": int(pid), "interface": i}
            for r, ip, pid, i in re.findall(r"rank (\d) on ([0-9.]+) \(pid (\d+), interface (\w+)\)", group_line)}


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.is_file() else []


def _listening(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def test_kill_a_learner_on_node_b_frees_the_adapter_slot(cluster, services, tiny_models, tmp_path):
    _node_b(cluster)
    import psutil

    run_a = _config(tiny_models, services, "run-a")
    a = Train(cluster, run_a, tmp_path)
    ranks = _ranks(a.group_line())
    assert len(ranks) == 2 and {r["ip"] for r in ranks.values()} >= {NODE_B_IP}, ranks  # one rank per node
    (b_rank,) = [r for r, x in ranks.items() if x["ip"] == NODE_B_IP]
    for x in ranks.values():  # gloo listens on the interface that holds the node's Ray IP
        addrs = {a.address for a in psutil.net_if_addrs()[x["interface"]]}
        gloo = _listening(x["pid"]) - {"0.0.0.0", "::"}
        assert gloo & addrs, (x, gloo, addrs)
    run_dir = Path(run_a["run"]["output_dir"])
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-000001" / "state.json").is_file():
        assert time.monotonic() < deadline and a.proc.poll() is None, "".join(a.lines[-40:])
        time.sleep(0.05)
    t0 = time.monotonic()
    os.kill(ranks[b_rank]["pid"], signal.SIGKILL)
    assert a.wait() == 4
    seconds = time.monotonic() - t0
    line = a.cli_line()
    # The phase it died in is timing: rank 0 (which writes the checkpoint) may be on node B and
    # still returning from save_checkpoint when the checkpoint's state.json appears.
    assert (f"learner worker rank {b_rank} (node {NODE_B_IP} / " in line and f"pid {ranks[b_rank]['pid']})" in line
            and re.search(r"died during (train_step|save_checkpoint|save_adapter):", line)
            and line.endswith("(--resume)")), line
    assert "\x1b[" not in line
    assert seconds < 30, seconds
    print(f"\nmeasured: SIGKILL of rank {b_rank} on node B -> exit 4 in {seconds:.1f} s")

    # The failed run freed its slot: a second run on the same one-slot policy_gen trains (it
    # waited out its step deadline for the slot, then failed, while run A's adapter stayed loaded).
    b = Train(cluster, _config(tiny_models, services, "run-b", steps=1), tmp_path)
    assert b.wait() == 0, "".join(b.lines[-30:])
    assert _steps(Path(services["runs"] / "run-b")) == [1]


def test_ray_address_from_the_environment_joins_the_cluster(cluster):
    _node_b(cluster)
    code = ("from trainer.ppo.actors import init_ray; from trainer.ppo.config import RaySection; import ray; "
            "assert init_ray(RaySection(num_cpus=2)); print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env=cluster.env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert NODE_B_IP in out.stdout and "ray.num_cpus 2 is ignored" in out.stderr


def _driver(cluster, tiny_models, tmp_path, wait_s: float, workers: int, lost_ip: str | None = None) -> subprocess.Popen:
    return learner_driver(cluster, REPO, tiny_models["policy"], tmp_path, wait_s, workers, lost_ip)


def _new_node_b(cluster, cpus: int = 1) -> None:
    """Node B as a machine that (re)joins: whatever is left of the last one is stopped first."""
    cluster.node_b.stop()
    cluster.start_node_b(cpus)


def _node_b(cluster, cpus: int = 1) -> None:
    """Node B up with `cpus` CPUs, whatever the tests before this one did to it (the tests run in
    any order, and several leave node B frozen, killed or CPU-less): a new one unless the one
    there is untouched and has that many."""
    if not cluster.node_b_intact(cpus):
        _new_node_b(cluster, cpus)


def test_placement_that_cannot_happen_is_logged_and_bounded(cluster, tiny_models, tmp_path):
    _node_b(cluster)
    p = _driver(cluster, tiny_models, tmp_path, 4, 3)  # 3 workers of one CPU on 2 CPUs
    out, err = p.communicate(timeout=180)
    assert p.returncode == 4, err[-3000:]
    assert "waiting to place 3 learner workers" in err and "s left (ray.placement_wait_s)" in err, err[-3000:]
    assert "could not place 3 learner workers ({'CPU': 1} each) in 4 s (ray.placement_wait_s): 2 alive node(s)" in out


def test_hung_node_names_the_rank_on_it(cluster, tiny_models, tmp_path):
    """SIGSTOP node B (raylet and workers) mid-update: the rank on the head is blocked in the
    all-reduce and cannot answer anything; Ray's node table says which node is gone. Node B
    does not come back: the tests after it join a new one."""
    _node_b(cluster)
    p = _driver(cluster, tiny_models, tmp_path, 120, 2)
    b_rank = rank_on_node_b(p)
    cluster.node_b.signal(signal.SIGSTOP)
    try:
        send_second_step(p, wait_sent=False)  # node B is frozen: the reply may never come
        out, err = p.communicate(timeout=120)
    finally:
        cluster.node_b.signal(signal.SIGCONT)
    assert p.returncode == 4, err[-3000:]
    assert f"learner worker rank {b_rank} (node {NODE_B_IP} / " in out and "died during train_step" in out, out
    # Which of Ray's signals comes first (the node table, or the actor failed with its node) varies.
    assert "ActorDiedError" in out or f"Ray reports its node {NODE_B_IP} dead" in out, out
    print(f"\nmeasured: node B frozen -> {out.strip()}")


def test_lost_raylet_names_the_rank_then_resume_without_the_node_is_bounded(cluster, tiny_models, tmp_path):
    """Node B's raylet SIGKILLed while the group is in a train_step (the machine's Ray is gone):
    exit 4 naming the rank on node B. Then a `--resume` while node B is still missing: the
    placement waits ray.placement_wait_s, logging the alive and lost nodes and the time left,
    and fails naming the lost node instead of waiting in silence."""
    _new_node_b(cluster)
    p = _driver(cluster, tiny_models, tmp_path, 120, 2)
    b_rank = rank_on_node_b(p)
    send_second_step(p)
    t0 = time.monotonic()
    cluster.node_b.kill_raylet()
    out, err = p.communicate(timeout=120)
    seconds = time.monotonic() - t0
    assert p.returncode == 4, err[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("ERROR")]
    assert f"learner worker rank {b_rank} (node {NODE_B_IP} / " in line and "died during train_step" in line, out
    assert line.endswith("(--resume)") and "\x1b[" not in line, line
    print(f"\nmeasured: node B's raylet SIGKILLed -> driver fails in {seconds:.1f} s: {line}")

    p = _driver(cluster, tiny_models, tmp_path, 4, 2, lost_ip=NODE_B_IP)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 4, err[-3000:]
    # The head's address is what Ray makes of it (here the host's own IP); node B, lost, is named once.
    lost = rf"1 alive node\(s\) \([0-9.]+\), lost: {re.escape(NODE_B_IP)}; free \{{'CPU': 1\.0\}} of \{{'CPU': 1\.0\}}"
    assert re.search(r"could not place 2 learner workers \(\{'CPU': 1\} each\) in 4 s \(ray\.placement_wait_s\): "
                     + lost + "; lower learner.num_workers, add nodes or wait for a lost node to rejoin", out), out
    waits = [x for x in err.splitlines() if "waiting to place 2 learner workers" in x]
    assert waits and re.search(f"the cluster has {lost}; \\d+ s left \\(ray\\.placement_wait_s\\)", waits[0]), err[-3000:]


def _on_node_b_talking_to(cluster, port: int):
    """The process of node B with a connection open to `port` on this host (a rollout worker mid-request), or None."""
    import psutil

    for proc in cluster.node_b.processes():
        try:
            if any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in proc.net_connections("tcp")):
                return proc
        except psutil.Error:
            continue
    return None


def test_node_with_a_rollout_worker_lost_mid_rollout_the_run_goes_on(cluster, services, tiny_models, tmp_path):
    """Node B holds one of two rollout workers and no learner (no CPU for one). It dies while its
    worker waits on a service mid-rollout: Ray restarts the worker on the head, the step's rollout
    is redone, and the run finishes every step once, exit 0."""
    from urllib.parse import urlparse

    _new_node_b(cluster, cpus=0)
    cfg = _config(tiny_models, services, "run-rollout", step_timeout_s=180)
    cfg["ray"]["num_rollout_workers"] = 2
    cfg["learner"]["num_workers"] = 1
    run_dir = Path(cfg["run"]["output_dir"])
    t = Train(cluster, cfg, tmp_path)
    deadline = time.monotonic() + 300
    while _steps(run_dir) != [1]:  # step 1 is done (after it: a checkpoint, then step 2's rollout)
        assert time.monotonic() < deadline and t.proc.poll() is None, "".join(t.lines[-40:])
        time.sleep(0.01)
    # The reward service frozen: no rollout can finish (every sample is scored), so node B's
    # worker is caught mid-rollout, its scoring request in flight, when the node goes.
    pref_port = urlparse(services["pref"]).port
    os.kill(services["pref_pid"], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while (worker := _on_node_b_talking_to(cluster, pref_port)) is None:
            assert time.monotonic() < deadline and t.proc.poll() is None, (
                "no rollout worker of node B reached the reward service; node B runs "
                + repr([(p.pid, p.name(), p.cmdline()[:2]) for p in cluster.node_b.processes()]) + "\n"
                + "".join(t.lines[-60:]))
            time.sleep(0.2)
        t0 = time.monotonic()
        cluster.node_b.signal(signal.SIGKILL)  # the machine is gone: raylet, agents and the rollout worker
    finally:
        os.kill(services["pref_pid"], signal.SIGCONT)
    seen: dict[str, float] = {}  # seconds from the loss to: the redo's log line, the step's metrics row
    while len(seen) < 2 and t.proc.poll() is None and time.monotonic() - t0 < 300:
        redo = [x for x in list(t.lines) if "rollout failed" in x and "redoing it" in x]
        if redo and "redo" not in seen:
            seen["redo"], step = time.monotonic() - t0, int(re.search(r"step (\d+): rollout failed", redo[0])[1])
        if "redo" in seen and step in _steps(run_dir):
            seen["step"] = time.monotonic() - t0
        time.sleep(0.1)
    assert t.wait() == 0, "".join(t.lines[-40:])
    assert _steps(run_dir) == [1, 2, 3]
    redo = [x for x in t.lines if "rollout failed" in x and "redoing it" in x]
    # Ray's words for a worker on a lost node (died, or unavailable while it restarts elsewhere),
    # and which node is gone, once Ray has declared it dead (the first redo may come before).
    assert redo and re.search(r"The actor \w+ (is unavailable|died)", redo[0]), "".join(t.lines[-40:])
    assert any(f"lost: {NODE_B_IP}; free" in x and "a lost rollout worker restarts on a node that is alive" in x
               for x in redo), "".join(redo)
    print(f"\nmeasured: node B lost while its rollout worker (pid {worker.pid}) waited on the reward service -> "
          f"step {step}'s redo logged {seen.get('redo', float('nan')):.1f} s and the step done "
          f"{seen.get('step', float('nan')):.1f} s after the loss; exit 0:\n" + "".join(redo))
