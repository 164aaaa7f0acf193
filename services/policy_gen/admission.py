"""Fair admission at the vLLM front door: a heavy run cannot occupy every sequence slot of vLLM.

vLLM schedules its own continuous batch, first come first served: once one run's requests
fill its `max_num_seqs` slots, another run's request waits in vLLM's queue behind all of them.
The front door therefore keeps the sequences it has in vLLM (prompts x n of the requests it
forwarded and that have not finished) within vLLM's capacity, queues the rest per run (the
X-CRS-Run id), and when slots free up admits the waiting request of the run with the fewest
sequences in vLLM for its weight. One run may hold at most `run_cap` sequences (default 7/8 of
the capacity), so a run that shows up finds free slots at once instead of waiting for a heavy
run's requests to finish: vLLM cannot preempt them for us. A request larger than a cap is
admitted alone (when its run, or the whole server, has nothing in flight), never refused forever.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def admit_next(
    inflight: dict[str, int], heads: dict[str, tuple[int, float]], weights: dict[str, float],
    capacity: int, run_cap: int,
) -> str | None:
    """The run whose first waiting request goes into vLLM now, or None. Pure.

    inflight: run -> sequences it has in vLLM; heads: run -> (sequences, arrival) of its first
    waiting request. Runs whose next request would put them over `run_cap` (with some already in
    flight) sit out; of the rest, the fewest in flight per weight goes first (then the oldest
    request), and only if its request fits the free slots: a big request is not overtaken
    forever by small ones.

    >>> admit_next({"heavy": 14}, {"heavy": (2, 0.0), "light": (1, 1.0)}, {}, 16, 14)
    'light'
    >>> admit_next({"heavy": 14, "light": 1}, {"heavy": (2, 0.0)}, {}, 16, 14) is None
    True
    >>> admit_next({}, {"big": (40, 0.0)}, {}, 16, 14)  # too big for any cap: alone
    'big'
    """
    total = sum(inflight.values())
    ready = [r for r, (k, _) in heads.items() if inflight.get(r, 0) == 0 or inflight.get(r, 0) + k <= run_cap]
    if not ready:
        return None
    run = min(ready, key=lambda r: (inflight.get(r, 0) / weights.get(r, 1.0), heads[r][1]))
    k = heads[run][0]
    return run if total == 0 or total + k <= capacity else None


@dataclass(eq=False)
class _Ticket:
    run: str
    sequences: int
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class FairAdmission:
    """`async with gate.slot(run, sequences):` forwards one request; waits while vLLM is full."""

    def __init__(self, capacity: int, run_cap: int | None = None, weights: dict[str, float] | None = None):
        self.capacity = capacity
        self.run_cap = run_cap or max(capacity - max(capacity // 8, 1), 1)
        self.weights = dict(weights or {})
        self.inflight: dict[str, int] = {}
        self._waiting: dict[str, collections.deque[_Ticket]] = {}
        self.on_wait: Callable[[str, float], None] | None = None  # (run, seconds before admission)

    def queued_by_run(self) -> dict[str, int]:
        """Sequences waiting at the front door, per run (for /metrics)."""
        return {run: sum(t.sequences for t in q) for run, q in self._waiting.items() if q}

    async def acquire(self, run: str, sequences: int) -> None:
        """Wait until the request may go to vLLM; a cancelled wait (the client left) takes it out."""
        ticket = _Ticket(run, sequences, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(run, collections.deque()).append(ticket)
        self._grant()
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket.future.done() and not ticket.future.cancelled():
                self.release(run, sequences)  # admitted just as it was cancelled
            else:
                queue = self._waiting.get(run)
                if queue is not None and ticket in queue:
                    queue.remove(ticket)
                    if not queue:
                        del self._waiting[run]
                self._grant()  # it may have been the head that held others back
            raise
        if self.on_wait is not None:
            self.on_wait(run, time.monotonic() - ticket.arrival)

    def release(self, run: str, sequences: int) -> None:
        left = self.inflight.get(run, 0) - sequences
        if left > 0:
            self.inflight[run] = left
        else:
            self.inflight.pop(run, None)
        self._grant()

    def _grant(self) -> None:
        while True:
            heads = {run: (q[0].sequences, q[0].arrival) for run, q in self._waiting.items()}
            run = admit_next(self.inflight, heads, self.weights, self.capacity, self.run_cap)
            if run is None:
                return
            queue = self._waiting[run]
            ticket = queue.popleft()
            if not queue:
                del self._waiting[run]
            if ticket.future.done():  # cancelled, its task not yet back to take it out
                continue
            self.inflight[run] = self.inflight.get(run, 0) + ticket.sequences
            ticket.future.set_result(None)
