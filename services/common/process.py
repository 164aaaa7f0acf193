"""Start a service as a real child process on loopback and wait until it is ready.

Used by the tests, the benchmarks and `crs-rlhf demo`: every one of them talks to the
services over real HTTP, so they share one careful way to start and stop them (own process
group, readiness polling that notices an early crash, terminate-then-kill on the way out).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """A child process serving HTTP on `port`, ready once `ready_path` answers 200.

    >>> with ServiceProcess([sys.executable, "-m", "services.reward_pref", ...], port) as svc:
    ...     httpx.post(svc.url + "/v1/score", json=...)
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        *,
        host: str = "127.0.0.1",
        ready_path: str = "/ready",
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 300.0,
        name: str | None = None,
    ):
        self.argv = list(argv)
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.name = name or Path(self.argv[2] if len(self.argv) > 2 else self.argv[0]).name
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    def start(self) -> "ServiceProcess":
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
        out = self._log_file or subprocess.DEVNULL
        # A new session so Ctrl-C in a terminal reaches us, and we decide how children stop.
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, url: str | None = None) -> "ServiceProcess":
        """Poll `url` (default: this service's own) + ready_path; a process serving several
        ports (services.reward_shared) is waited on once per port."""
        url = url or self.url
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready{self._log_hint()}")
            try:
                if httpx.get(url + self.ready_path, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready on {url}{self.ready_path} within {self.startup_timeout:.0f}s{self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return f"\n--- last lines of {self.log_path} ---\n{tail}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ServiceProcess":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
