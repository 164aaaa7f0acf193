"""Helpers of the fairness / hang-up / probe tests: an app served by uvicorn in a thread, on
loopback, through the same uvicorn config the services use (head timeout included)."""

from __future__ import annotations

import threading
import time

import httpx

from services.common.process import free_port


class ThreadServer:
    """`with ThreadServer(app, settings) as srv:` -> srv.url; real HTTP, one process (fast)."""

    def __init__(self, app, settings=None, **overrides):
        import uvicorn

        from services.common.serving import uvicorn_config

        self.port = free_port()
        if settings is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", **overrides)
        else:
            config = uvicorn_config(app, settings, host="127.0.0.1", port=self.port, log_level="critical", **overrides)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120, headers=None) -> "ThreadServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", headers=headers, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the app never became ready")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def metric(url: str, prefix: str, headers=None) -> float:
    """Sum of the /metrics samples whose line starts with `prefix`."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def until(check, timeout: float = 30.0, poll_s: float = 0.05) -> bool:
    """True as soon as `check()` is, False if it never is within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(poll_s)
    return False
