"""SIGINT and SIGTERM both stop a PPO run the same way: finish the update in flight, checkpoint.

Kubernetes eviction, `docker stop` and stopping a Ray job send SIGTERM (then SIGKILL after
the grace period); Ctrl-C sends SIGINT. The handlers are installed explicitly for the
duration of `train()` rather than relying on Python's default SIGINT handler, which is absent
when the process inherited SIGINT as ignored (a shell's `cmd &` does that), and after
`ray.init`, which installs a SIGTERM handler of its own that exits without saving.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger("crs_rlhf.ppo")


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM: the shell convention


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, the first SIGINT/SIGTERM raises `Interrupted`; later ones are logged and
    ignored so the checkpoint being written is not cut short (SIGKILL still ends it).

    Yields the list of signals received: a library between the handler and the caller may
    re-raise the interrupt as a plain KeyboardInterrupt, and SIGTERM must still exit 143."""
    fired: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield fired  # signal handlers can only be set from the main thread (e.g. tests calling train() in a thread)
        return

    def handler(signum, _frame):
        if fired:
            log.warning("%s received while saving; still finishing the checkpoint", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield fired
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
