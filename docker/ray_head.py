#!/usr/bin/env python3
"""`crs-ray-head [RAY START OPTIONS]`: `ray start --head --block`, retried, with a ready marker.

Ray gives a new node's raylet a fixed 30 s to register with the GCS (ray/_private/node.py,
not configurable in Ray 2.60); on a busy small machine the head misses it and `ray start`
exits. Started straight from compose, that took the whole container down while `up --wait`
and the job submitter were counting on it. Here a failed start is cleaned up (`ray stop
--force`) and tried again, up to $CRS_RAY_START_ATTEMPTS times (default 5); the exit code
is Ray's once they are spent, so the restart policy still has the last word.

The dashboard answers /api/gcs_healthz before the raylet has registered, so that probe alone
calls a head healthy that may still fail its start. This wrapper writes $CRS_RAY_READY_FILE
(default /tmp/crs-ray-head.ready) when `ray start` reports the node started and removes it
before every attempt; the health check requires it. Stdlib only: it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

STARTED = "Ray runtime started"  # what `ray start` prints once the node is registered


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    attempts = max(1, int(os.environ.get("CRS_RAY_START_ATTEMPTS", "5")))
    ready = os.environ.get("CRS_RAY_READY_FILE", "/tmp/crs-ray-head.ready")
    ray = os.environ.get("CRS_RAY_BIN", "ray")
    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum, _frame):  # docker stop: let Ray shut its processes down itself
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 1
    for attempt in range(1, attempts + 1):
        if stopping:
            break
        if os.path.exists(ready):
            os.unlink(ready)
        # Unbuffered: the marker must not wait for a pipe buffer to fill.
        child = subprocess.Popen([ray, "start", "--head", "--block", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started = False
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if not started and STARTED in line:
                started = True
                with open(ready, "w") as f:
                    f.write(f"{time.time():.0f}\n")
        code = child.wait()
        if os.path.exists(ready):
            os.unlink(ready)
        if stopping or code == 0 or attempt == attempts:
            break  # stopped on purpose, or out of tries
        print(f"crs-ray-head: `ray start` exited {code} ({'after' if started else 'before'} the node started), "
              f"attempt {attempt}/{attempts}: cleaning up and starting again", file=sys.stderr, flush=True)
        subprocess.run([ray, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return 0 if stopping else code


if __name__ == "__main__":
    sys.exit(main())
