"""The trainer on a real two-node Ray cluster (tests/_two_node_ray.py: a head, and a raylet on
127.0.0.2 with its own temp dir, one CPU each), driven as a user would: `crs-rlhf train` with
`RAY_ADDRESS` set, a learner group of two workers (one per node), real services on loopback.

- kill the learner worker on node B mid-run: exit 4 naming its rank, node and pid; the failed
  run frees its policy_gen adapter slot, so a second run on the same policy_gen (one slot,
  `--max-loras 1`) trains instead of waiting for the slot and failing;
- gloo binds to the interface that holds each node's Ray IP (not what the hostname says);
- `RAY_ADDRESS` alone joins the cluster; a placement that cannot happen is logged and bounded;
- a hung node (SIGSTOP): the rank on it is named, not the healthy rank blocked in the all-reduce.

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
from _two_node_ray import NODE_B_IP, TwoNodeCluster

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
        yield {"runs": runs, "policy": procs["policy"].url, "pref": procs["pref"].url}
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
    assert (f"learner worker rank {b_rank} (node {NODE_B_IP} / " in line and f"pid {ranks[b_rank]['pid']})" in line
            and "died during train_step" in line and line.endswith("(--resume)")), line
    assert "\x1b[" not in line
    assert seconds < 30, seconds
    print(f"\nmeasured: SIGKILL of rank {b_rank} on node B -> exit 4 in {seconds:.1f} s")

    # The failed run freed its slot: a second run on the same one-slot policy_gen trains (it
    # waited out its step deadline for the slot, then failed, while run A's adapter stayed loaded).
    b = Train(cluster, _config(tiny_models, services, "run-b", steps=1), tmp_path)
    assert b.wait() == 0, "".join(b.lines[-30:])
    assert _steps(Path(services["runs"] / "run-b")) == [1]


def test_ray_address_from_the_environment_joins_the_cluster(cluster):
    code = ("from trainer.ppo.actors import init_ray; from trainer.ppo.config import RaySection; import ray; "
            "assert init_ray(RaySection(num_cpus=2)); print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env=cluster.env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert NODE_B_IP in out.stdout and "ray.num_cpus 2 is ignored" in out.stderr


DRIVER = """
import json, sys, time, logging
logging.basicConfig(level=logging.INFO)
import torch
from trainer.ppo.actors import init_ray
from trainer.ppo.config import PPOConfig, RaySection
from trainer.ppo.experience import RolloutSample
from trainer.ppo.learner_group import LearnerGroup, LearnerFailed
init_ray(RaySection())
cfg = PPOConfig.model_validate({"model": {"policy_path": sys.argv[1]}, "ppo": {"batch_size": 6, "mini_batch_size": 6},
                                "ray": {"placement_wait_s": float(sys.argv[3])}, "run": {"output_dir": sys.argv[2]}})
samples = [RolloutSample(i, [11, 12, 13], [14, 15], [-1.0, -1.0], "x", "length", r_pref=0.0, r_abs=0.0) for i in range(6)]
try:
    group = LearnerGroup(cfg, int(sys.argv[4]), collective_timeout_s=120)
except LearnerFailed as e:
    print("ERROR", e, flush=True); sys.exit(4)
print("NODES", json.dumps([[n["rank"], n["ip"]] for n in group.nodes]), flush=True)
group.train_step(samples)
print("STEP", flush=True)
sys.stdin.readline()  # the test freezes node B, then says go
t0 = time.monotonic()
try:
    group.train_step(samples)
except LearnerFailed as e:
    print("ERROR", round(time.monotonic() - t0, 1), e, flush=True); sys.exit(4)
"""


def _driver(cluster, tiny_models, tmp_path, wait_s: float, workers: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(tiny_models["policy"]), str(tmp_path), str(wait_s), str(workers)],
                            cwd=REPO, env=cluster.env(PYTHONPATH=str(REPO)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_placement_that_cannot_happen_is_logged_and_bounded(cluster, tiny_models, tmp_path):
    p = _driver(cluster, tiny_models, tmp_path, 4, 3)  # 3 workers of one CPU on 2 CPUs
    out, err = p.communicate(timeout=180)
    assert p.returncode == 4, err[-3000:]
    assert "waiting to place 3 learner workers" in err and "s left (ray.placement_wait_s)" in err, err[-3000:]
    assert "could not place 3 learner workers ({'CPU': 1} each) in 4 s (ray.placement_wait_s): 2 alive node(s)" in out


def test_hung_node_names_the_rank_on_it(cluster, tiny_models, tmp_path):
    """SIGSTOP node B (raylet and workers) mid-update: the rank on the head is blocked in the
    all-reduce and cannot answer anything; Ray's node table says which node is gone. Runs last:
    node B does not come back."""
    p = _driver(cluster, tiny_models, tmp_path, 120, 2)
    nodes = p.stdout.readline()
    assert nodes.startswith("NODES"), nodes + (p.stderr.read()[-3000:] if p.poll() is not None else "")
    (b_rank,) = [r for r, ip in eval(nodes[len("NODES"):]) if ip == NODE_B_IP]
    assert p.stdout.readline().startswith("STEP")
    cluster.node_b.signal(signal.SIGSTOP)
    try:
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=120)
    finally:
        cluster.node_b.signal(signal.SIGCONT)
    assert p.returncode == 4, err[-3000:]
    assert f"learner worker rank {b_rank} (node {NODE_B_IP} / " in out and "died during train_step" in out, out
    # Which of Ray's signals comes first (the node table, or the actor failed with its node) varies.
    assert "ActorDiedError" in out or f"Ray reports its node {NODE_B_IP} dead" in out, out
    print(f"\nmeasured: node B frozen -> {out.strip()}")
