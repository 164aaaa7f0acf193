"""docker/ray_head.py (`crs-ray-head`, the compose Ray head's entrypoint), run against a stand-in
`ray` executable: a start that dies before the node registers is cleaned up and retried, the
ready marker exists only while a start has succeeded, `docker stop` (SIGTERM) is a clean exit,
and once the attempts are spent Ray's own exit code is returned (the restart policy's turn).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "docker/ray_head.py"

# Fails its first $FAILS starts the way Ray 2.60 does when the raylet misses its 30 s, then
# starts and blocks until signalled. Every call is logged, so the test sees the `ray stop`s.
FAKE_RAY = """#!/bin/sh
echo "$*" >> "$LOG"
case "$1" in
  stop) exit 0 ;;
esac
n=$(grep -c '^start' "$LOG")
if [ "$n" -le "$FAILS" ]; then
  echo "Exception: The current node timed out during startup."
  exit 1
fi
echo "Ray runtime started."
trap 'exit 143' TERM
while :; do sleep 0.1; done
"""


def wrapper(tmp_path: Path, fails: int, attempts: int) -> tuple[subprocess.Popen, Path, Path]:
    ray = tmp_path / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    log, ready = tmp_path / "calls.log", tmp_path / "ready"
    env = {**os.environ, "CRS_RAY_BIN": str(ray), "LOG": str(log), "FAILS": str(fails),
           "CRS_RAY_START_ATTEMPTS": str(attempts), "CRS_RAY_READY_FILE": str(ready)}
    proc = subprocess.Popen([sys.executable, str(WRAPPER), "--port=6379", "--dashboard-port=8265"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log, ready


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_failed_start_is_cleaned_up_and_retried_then_ready_until_stopped(tmp_path):
    proc, log, ready = wrapper(tmp_path, fails=2, attempts=5)
    try:
        wait_for(ready, proc)
        calls = log.read_text().splitlines()
        # Two failed starts, each followed by `ray stop --force`, then the start that succeeded;
        # the options reach `ray start` unchanged.
        assert calls == ["start --head --block --port=6379 --dashboard-port=8265", "stop --force"] * 2 + [
            "start --head --block --port=6379 --dashboard-port=8265"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not ready.exists(), "a stopped head must not look ready"
    assert out.count("timed out during startup") == 2 and "Ray runtime started." in out
    assert err.count("cleaning up and starting again") == 2 and "attempt 2/5" in err


def test_spent_attempts_return_rays_exit_code_and_never_mark_ready(tmp_path):
    proc, log, ready = wrapper(tmp_path, fails=10, attempts=3)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert not ready.exists()
    assert out.count("timed out during startup") == 3, "Ray's own output reaches the container log"
    assert err.count("cleaning up and starting again") == 2 and "attempt 2/3" in err
    calls = log.read_text().splitlines()
    assert calls.count("start --head --block --port=6379 --dashboard-port=8265") == 3
    assert calls.count("stop --force") == 2, "no cleanup after the last attempt: the container exits anyway"
