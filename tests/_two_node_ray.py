"""A real two-node Ray cluster on one machine: a head and a second raylet on 127.0.0.2.

Each node is a `ray start --block` process in its own session (own process group) with its
own temp dir and one CPU, so a test can lose node B for real: SIGKILL every process of it (the
machine died), SIGSTOP them (the machine hangs), or SIGKILL its raylet alone.
`RAY_AUTH_MODE=disabled` on every process of the cluster and on its drivers, so the second
raylet is admitted without a token. Drivers reach it through `RAY_ADDRESS` (`env()`); every port is chosen free here, so two clusters (or
other tests' local Ray) on the same machine never collide. Never `ray stop`: it would stop
every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from services.common.process import free_port

NODE_B_IP = "127.0.0.2"


def ray_bin() -> str:
    import sys

    return shutil.which("ray") or str(Path(sys.executable).parent / "ray")


class RayNode:
    def __init__(self, argv: list[str], log: Path, env: dict, cpus: int):
        self.log = log
        self.cpus = cpus
        self._out = open(log, "ab")  # noqa: SIM115 - open for the life of the node, closed in stop()
        # A node started again appends to its predecessor's log: only what this one writes counts.
        self._log_start = self._out.tell()
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.disturbed = False  # a test signalled it or killed its raylet: Ray may hold it dead

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self._own_log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self._own_log()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"ray start not up in {timeout:.0f} s:\n{self._own_log()[-3000:]}")

    def _own_log(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def signal(self, sig: int) -> None:
        """To the whole node: `ray start`, its raylet, agents and every worker process it started.
        Ray starts each worker in a process group of its own, so the node's group alone would
        miss the workers: they are signalled one by one (found before any parent dies and
        orphans them)."""
        import psutil

        self.disturbed = True
        procs = self.processes()
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def processes(self) -> list:
        """Every live process of the node (psutil): `ray start`, its raylet, agents and workers."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_raylet(self) -> int:
        """SIGKILL the node's raylet process alone (as a crash or the OOM killer would); returns its pid.
        What follows is Ray's own doing: its workers lose their raylet and exit, and `ray start
        --block` sees a child die and kills the rest of the node."""
        (raylet,) = [p for p in self.processes() if p.name() == "raylet"]
        self.disturbed = True
        raylet.kill()
        return raylet.pid

    def stop(self) -> None:
        import psutil

        procs = self.processes()  # found now: once `ray start` exits they are orphans, out of reach
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            # SIGTERM to `ray start` alone: it drains the node through the GCS, then stops its
            # processes. Sent to the whole group, it would stop the head's GCS first, and the
            # drain would wait 30 s for it.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # whatever is left: the group, and workers in groups of their own
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self._out.close()


class TwoNodeCluster:
    """`head` (the driver's node) and `node_b` (127.0.0.2), one CPU each unless told otherwise."""

    def __init__(self, root: Path, cpus: tuple[int, int] = (1, 1), timeout: float = 240.0, extra_env: dict | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.base_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                         # A loaded machine starts a node's Python agents slowly: give them time to register.
                         "RAY_agent_register_timeout_ms": "180000", **(extra_env or {})}
        self.base_env.pop("RAY_ADDRESS", None)
        # /tmp, not pytest's deep tmp_path: Ray's socket paths must stay under 107 characters.
        self._tmp = [Path(f"/tmp/crs-ray-{self.port}-{x}") for x in ("head", "b")]
        self.node_b: RayNode | None = None
        self.head = self._start("head", cpus[0], timeout)
        try:
            self.start_node_b(cpus[1], timeout)
        except BaseException:
            self.head.stop()
            raise

    def _start(self, which: str, cpus: int, timeout: float, tries: int = 5) -> RayNode:
        # On a loaded machine the raylet may give up waiting (30 s) for its dashboard agent to
        # start ("Timed out waiting for file ..."); a second try usually makes it.
        for attempt in range(tries):
            node = RayNode(self._argv(cpus, which), self.root / f"ray-{which}.log", self.base_env, cpus)
            try:
                node.wait_started(timeout)
                return node
            except (RuntimeError, TimeoutError):
                node.stop()
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def _argv(self, cpus: int, which: str) -> list[str]:
        argv = [ray_bin(), "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}",
                f"--object-store-memory={96 * 1024 * 1024}", f"--temp-dir={self._tmp[0 if which == 'head' else 1]}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                "--min-worker-port=0", "--max-worker-port=0"]  # workers take ports the OS gives them
        if which == "head":
            return argv + ["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                           f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        return argv + [f"--address={self.address}", f"--node-ip-address={NODE_B_IP}"]

    def start_node_b(self, cpus: int = 1, timeout: float = 240.0) -> RayNode:
        """(Re)join node B, as a machine coming back after it was lost."""
        self.node_b = self._start("b", cpus, timeout)
        return self.node_b

    def node_b_intact(self, cpus: int) -> bool:
        """Node B runs with `cpus` CPUs and no test has signalled it since it started."""
        b = self.node_b
        return b is not None and not b.disturbed and b.proc.poll() is None and b.cpus == cpus

    def env(self, **extra: str) -> dict:
        """Environment for a driver of this cluster (the `crs-rlhf train` CLI, a python -c)."""
        return {**self.base_env, "RAY_ADDRESS": self.address, **extra}

    def close(self) -> None:
        for node in (self.node_b, self.head):
            if node is not None:
                node.stop()
        for t in self._tmp:
            shutil.rmtree(t, ignore_errors=True)


# A driver of the cluster holding a LearnerGroup (argv: policy path, output dir, ray.placement_wait_s,
# workers[, an IP]): with an IP it first waits until Ray reports that node dead (a `--resume`
# while a node is lost). Prints NODES (rank, IP) and STEP after one train_step; on a line on
# stdin it sends a second step, prints SENT, and waits for it. A LearnerFailed is printed as
# `ERROR <seconds it took> <message>`, exit 4 (as the CLI's).
LEARNER_DRIVER = """
import json, sys, time, logging
logging.basicConfig(level=logging.INFO)
import ray
from trainer.ppo.actors import init_ray
from trainer.ppo.config import PPOConfig, RaySection
from trainer.ppo.experience import RolloutSample
from trainer.ppo.learner_group import LearnerGroup, LearnerFailed
init_ray(RaySection())
if len(sys.argv) > 5:
    deadline = time.monotonic() + 120
    while any(n["Alive"] and n["NodeManagerAddress"] == sys.argv[5] for n in ray.nodes()):
        assert time.monotonic() < deadline, "the node was never reported dead"
        time.sleep(0.5)
cfg = PPOConfig.model_validate({"model": {"policy_path": sys.argv[1]}, "ppo": {"batch_size": 6, "mini_batch_size": 6},
                                "ray": {"placement_wait_s": float(sys.argv[3])}, "run": {"output_dir": sys.argv[2]}})
samples = [RolloutSample(i, [11, 12, 13], [14, 15], [-1.0, -1.0], "x", "length", r_pref=0.0, r_abs=0.0) for i in range(6)]
t0 = time.monotonic()
try:
    group = LearnerGroup(cfg, int(sys.argv[4]), collective_timeout_s=120)
except LearnerFailed as e:
    print("ERROR", round(time.monotonic() - t0, 1), e, flush=True); sys.exit(4)
print("NODES", json.dumps([[n["rank"], n["ip"]] for n in group.nodes]), flush=True)
group.train_step(samples)
print("STEP", flush=True)
sys.stdin.readline()  # the test is ready to lose node B
t0 = time.monotonic()
call = group.train_step_async(samples)
print("SENT", flush=True)
try:
    group.train_step_result(call)
except LearnerFailed as e:
    print("ERROR", round(time.monotonic() - t0, 1), e, flush=True); sys.exit(4)
"""


def learner_driver(cluster: TwoNodeCluster, repo: Path, policy: Path, out: Path, wait_s: float, workers: int,
                   lost_ip: str | None = None) -> subprocess.Popen:
    """LEARNER_DRIVER as a subprocess on `cluster` (stdin/stdout/stderr are pipes, text)."""
    import sys

    return subprocess.Popen([sys.executable, "-c", LEARNER_DRIVER, str(policy), str(out), str(wait_s), str(workers),
                             *([lost_ip] if lost_ip else [])],
                            cwd=repo, env=cluster.env(PYTHONPATH=str(repo)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_on_node_b(driver: subprocess.Popen) -> int:
    """After LEARNER_DRIVER's first step (its NODES and STEP lines): the rank it placed on node B."""
    nodes = driver.stdout.readline()
    assert nodes.startswith("NODES"), nodes + (driver.stderr.read()[-3000:] if driver.poll() is not None else "")
    (b_rank,) = [r for r, ip in json.loads(nodes[len("NODES"):]) if ip == NODE_B_IP]
    assert driver.stdout.readline().startswith("STEP")
    return b_rank


def send_second_step(driver: subprocess.Popen, *, wait_sent: bool = True) -> None:
    """Let LEARNER_DRIVER send its second train_step; with `wait_sent`, return once it is in flight."""
    driver.stdin.write("go\n")
    driver.stdin.flush()
    if wait_sent:
        assert driver.stdout.readline().startswith("SENT")
