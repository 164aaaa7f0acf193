"""Node loss on a real two-node Ray cluster on loopback: how long until the learner group says so.

    python bench/node_loss.py [--health default fast] [--placement-wait 10] [--repeats 1]

Starts a head and a second raylet on 127.0.0.2 (tests/_two_node_ray.py: one CPU each, own temp
dirs), then, in a driver process holding a LearnerGroup of two workers (one per node, tiny
policy model, gloo), measures two cases:

  raylet   SIGKILL of node B's raylet process while the group is in a train_step: seconds from
           the kill (in this process) until the driver's LearnerFailed naming the rank on node B;
  resume   a new LearnerGroup of two while node B is still lost, as `--resume` starts: seconds
           from the group's creation until its failure ("could not place ... lost: 127.0.0.2"),
           with ray.placement_wait_s set to --placement-wait, and whether the wait was logged
           (alive and lost nodes, free resources, time left).

`--health default` runs with Ray's own node health checks (what a user gets); `fast` with checks
of 1 s × 3 (RAY_health_check_period_ms / _timeout_ms / _failure_threshold), as tests/test_multinode.py
does. Each setting starts its own cluster. Prints, per setting and repeat:

    RESULT health=<h> raylet_s=<x> raylet_blame=<rank on node B?> resume_s=<y> resume_wait_s=<W> resume_logged=<bool>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

FAST = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _error_line(out: str) -> str:
    lines = [x for x in out.splitlines() if x.startswith("ERROR")]
    return lines[0] if lines else f"(no ERROR line) {out[-500:]}"


def measure(root: Path, policy: Path, health: str, placement_wait: float) -> dict:
    from _two_node_ray import NODE_B_IP, TwoNodeCluster, learner_driver, rank_on_node_b, send_second_step

    cluster = TwoNodeCluster(root / "cluster", extra_env=FAST if health == "fast" else None)
    try:
        p = learner_driver(cluster, REPO, policy, root / "out", 120, 2)
        b_rank = rank_on_node_b(p)
        send_second_step(p)
        t0 = time.monotonic()
        cluster.node_b.kill_raylet()
        out, err = p.communicate(timeout=300)
        raylet_s = time.monotonic() - t0
        line = _error_line(out)
        print(f"[{health}] raylet killed -> exit {p.returncode} in {raylet_s:.1f} s: {line}", flush=True)
        blame = f"learner worker rank {b_rank} (node {NODE_B_IP} / " in line

        p = learner_driver(cluster, REPO, policy, root / "out", placement_wait, 2, lost_ip=NODE_B_IP)
        out, err = p.communicate(timeout=300 + placement_wait)
        line = _error_line(out)
        resume_s = float(line.split()[1]) if line.startswith("ERROR") else float("nan")
        waits = [x for x in err.splitlines() if "waiting to place 2 learner workers" in x]
        logged = bool(waits) and all(k in waits[0] for k in (f"lost: {NODE_B_IP}", "free {", "s left (ray.placement_wait_s)"))
        print(f"[{health}] resume without node B -> exit {p.returncode} in {resume_s:.1f} s: {line}", flush=True)
        for w in waits:
            print(f"[{health}]   log: {w[w.index('waiting'):]}", flush=True)
        return {"health": health, "raylet_s": round(raylet_s, 1), "raylet_blame": blame, "resume_s": resume_s,
                "resume_wait_s": placement_wait, "resume_logged": logged}
    finally:
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--health", nargs="+", choices=("default", "fast"), default=["default", "fast"])
    ap.add_argument("--placement-wait", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from crs_rlhf.tiny_models import make_tiny_models

    with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp:
        policy = make_tiny_models(Path(tmp) / "models", seed=0)["policy"]
        for health in args.health:
            for i in range(args.repeats):
                r = measure(Path(tmp) / f"{health}-{i}", policy, health, args.placement_wait)
                print("RESULT " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
