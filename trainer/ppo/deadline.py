"""One step's deadline (`run.step_timeout_s`): every way a step can spend time failing and
recovering draws on the same clock, so a broken service fails the step in bounded time.

What draws on it, each logged under its own name when it waits: the HTTP clients' retries
(reward scoring, generation), redoing the step's rollout, waiting for services' `/ready`, and
waiting for a free adapter slot in policy_gen. The clock runs from the step's start through its
rollout and the adapter sync; it stops while the learner updates (`paused`), which has bounds of
its own (a dead worker fails the step, `learner.collective_timeout_s`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

KEY = "run.step_timeout_s"


class StepDeadline:
    """`seconds` from now (monotonic); `left()` is what the next wait may take."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds

    def left(self) -> float:
        """Seconds left (0 once spent)."""
        return max(0.0, self._end - self._clock())

    @property
    def spent(self) -> bool:
        return self.left() <= 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside the block does not count."""
        start = self._clock()
        try:
            yield
        finally:
            self._end += self._clock() - start

    def __str__(self) -> str:
        return f"{KEY} = {self.seconds:.0f} s"
