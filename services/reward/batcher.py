"""Cross-request dynamic batching: many small requests -> few length-sorted forward passes.

Requests put their token-id rows on an asyncio-side queue and await one future. A collector
task waits up to `max_wait_ms` (or until a window's worth of tokens is queued), takes a
look-ahead window of rows, sorts it by length and cuts it into micro-batches whose padded
size (rows x longest row) stays under `max_batch_tokens` and whose padding stays under
`max_padding` -- padding waste is what makes naive batching slow. One micro-batch goes to the
worker; the window's other rows go back to the front of their queues and compete again for
the next pass. Forward passes run on ONE dedicated worker thread so the event loop never
blocks; a request's rows may land in different micro-batches and are reassembled in order.

Fair between runs: rows queue per run (`submit(rows, run=...)`, the X-CRS-Run id; requests
without one share a queue). Whose turn the next pass is follows start-time fair queueing in
tokens (`FairClock`, optionally weighted per run): the run that has been served the fewest
tokens goes next, and a run that was idle starts level with the pass in flight, so a light
run's row waits for at most the pass that is running, never for a heavy run's backlog. The rest
of the look-ahead window is filled by deficit round-robin across the runs with rows waiting.
While more than one run has rows waiting or sent work within CONTENTION_S, a padded pass takes
at most `contended_batch_tokens` (default half the budget): a newcomer's wait for the pass in
flight is what bounds its latency, and on CPU a smaller pass costs the same per token. A caller
that goes away (its `submit` is cancelled) takes its rows out of the queue: only a pass already
running scores them.

Packed mode (`packed=` a scorer of packed rows, `--packing on`): the window holds up to
WINDOW_BATCHES rows' worth of tokens (row length x rows), planned into packed rows by first-fit
decreasing (packing.py) instead of padded micro-batches; one row is one forward pass. An
item's score never depends on its neighbours: the scorer masks each item off from the rest of
its row (exact in fp32; in bf16 a row's matmuls may round an item differently next to other
items, within the bf16 bound in docs/reward_gpu.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from services.reward.packing import PackedRow, plan_packed_rows

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[Sequence[int]]], list[float]]


class RowScorer(Protocol):
    """What packed mode needs (services.reward.packed_forward.PackedScorer is one)."""

    row_tokens: int
    buckets: tuple[int, ...]

    def score_row(self, rows: Sequence[Sequence[int]], row: PackedRow) -> list[float]:
        """Scores of row.items (indices into `rows`), in row.items order."""
        ...


WINDOW_BATCHES = 4  # a collector window holds up to this many budgets of real tokens
CONTENTION_S = 1.0  # runs that sent work within this many seconds count as competing for passes


class QueueFullError(Exception):
    """The queue bound is reached; the route answers 503 with Retry-After."""


@dataclass
class _Request:
    """One caller's rows; `future` resolves with their scores, in the caller's order."""

    rows: list[list[int]]
    future: asyncio.Future
    scores: list[float | None] = field(init=False)
    left: int = field(init=False)
    started: bool = field(init=False, default=False)  # a row of it has gone to the worker (its wait is over)

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.rows)
        self.left = len(self.rows)


@dataclass(frozen=True)
class _Row:
    request: _Request
    index: int  # position inside request.rows
    arrival: float  # time.monotonic() when its request was queued

    @property
    def ids(self) -> list[int]:
        return self.request.rows[self.index]


@dataclass
class _RunQueue:
    """One run's waiting rows and its deficit (tokens it may still take this round)."""

    rows: collections.deque = field(default_factory=collections.deque)
    tokens: int = 0
    deficit: float = 0.0


def deficit_round_robin(
    queues: dict[str, collections.deque], deficits: dict[str, float], weights: dict[str, float],
    quantum: int, budget: int, cost: Callable[[object], int], order: list[str],
) -> list[tuple[str, object]]:
    """Items taken from per-key FIFO `queues` by deficit round-robin, up to `budget` cost.

    Each round every key with items earns `quantum x weight` of deficit and takes items from
    its head while their cost fits its deficit; a key whose queue empties loses its deficit.
    `order` (keys, rotated in place) makes the round start where the last call left off.
    Mutates queues, deficits and order. Pure otherwise, so the policy is testable:

    >>> q = {"heavy": collections.deque([5] * 6), "light": collections.deque([5])}
    >>> d, order = {"heavy": 0.0, "light": 0.0}, ["heavy", "light"]
    >>> [k for k, _ in deficit_round_robin(q, d, {}, 5, 20, lambda x: x, order)]
    ['heavy', 'light', 'heavy', 'heavy']
    """
    taken: list[tuple[str, object]] = []
    used = 0
    if quantum <= 0:
        raise ValueError("quantum must be positive")
    while used < budget and any(queues[k] for k in order):
        for _ in range(len(order)):
            key = order[0]
            order.append(order.pop(0))
            queue = queues[key]
            if not queue:
                deficits[key] = 0.0
                continue
            deficits[key] += quantum * weights.get(key, 1.0)
            while queue and cost(queue[0]) <= deficits[key]:
                c = cost(queue[0])
                if taken and used + c > budget:
                    return taken
                deficits[key] -= c
                used += c
                taken.append((key, queue.popleft()))
            if not queue:
                deficits[key] = 0.0
            if used >= budget:
                return taken
    return taken


class FairClock:
    """Start-time fair queueing over passes: which run's row leads the next pass.

    Each run has a tag, the tokens it has been served divided by its weight, on a virtual clock
    `now` (the tag of the run that led the latest pass). The run with the smallest tag goes next;
    a run that becomes active starts at `now` at the earliest, so an idle run banks no credit,
    and a newcomer (tag `now`) is ahead of the run whose pass is in flight (tag `now` + that
    pass). Pure bookkeeping, no clock or I/O, so the policy is testable:

    >>> c = FairClock()
    >>> c.join("heavy"); c.served("heavy", {"heavy": 2048})  # heavy's pass is in flight
    >>> c.join("light"); c.pick(["heavy", "light"])
    'light'
    >>> c.served("light", {"light": 60}); c.pick(["heavy", "light"])
    'light'
    """

    def __init__(self, weights: dict[str, float] | None = None):
        self.weights = dict(weights or {})
        self.now = 0.0
        self.tags: dict[str, float] = {}

    def join(self, run: str) -> None:
        """`run` has work again (was idle or new)."""
        self.tags[run] = max(self.tags.get(run, self.now), self.now)

    def pick(self, runs: list[str]) -> str:
        """The run whose turn it is among `runs` (non-empty); ties go to the earlier in `runs`."""
        return min(runs, key=lambda r: self.tags.get(r, self.now))

    def served(self, leader: str, tokens_by_run: dict[str, int]) -> None:
        """A pass led by `leader` took `tokens_by_run`: the clock moves to the leader's tag."""
        self.now = max(self.now, self.tags.get(leader, self.now))
        for run, tokens in tokens_by_run.items():
            start = max(self.tags.get(run, self.now), self.now)
            self.tags[run] = start + tokens / self.weights.get(run, 1.0)

    def forget_idle(self, active: set[str]) -> None:
        """Drop the tags of idle runs that no longer matter (at or behind the clock): the map
        stays as small as the runs served lately, however many run ids come and go."""
        for run in [r for r, t in self.tags.items() if r not in active and t <= self.now]:
            del self.tags[run]


@dataclass(frozen=True)
class BatchStats:
    """Reported once per forward pass (for metrics)."""

    rows: int
    tokens: int  # real tokens
    padded_tokens: int  # tokens computed: rows x longest row, or a packed row's bucket length
    seconds: float

    @property
    def fill(self) -> float:
        """real / computed tokens: 1.0 = no compute spent on padding."""
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0


def plan_micro_batches(lengths: Sequence[int], max_batch_tokens: int, max_padding: float = 1.0) -> list[list[int]]:
    """Indices grouped into length-sorted micro-batches.

    Each batch keeps rows x longest <= max_batch_tokens and its pad tokens <= max_padding x
    its real tokens (on CPU every pad token costs as much as a real one; on GPU a fuller
    batch is worth some padding). A row longer than the budget gets a batch of its own.
    Pure, so the policy is testable.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:  # ascending, so lengths[i] is the longest row if i joins `current`
        padded = (len(current) + 1) * lengths[i]
        if current and (padded > max_batch_tokens or padded - (real + lengths[i]) > max_padding * (real + lengths[i])):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


class DynamicBatcher:
    """`await batcher.submit(rows)` -> scores; call `start()` inside the event loop first."""

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 4.0,
        max_queue_items: int = 16384,
        max_queue_tokens: int | None = None,
        max_padding: float = 1.0,
        cross_request: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
        worker_init: Callable[[], None] | None = None,
        packed: RowScorer | None = None,
        fair: bool = True,
        run_weights: dict[str, float] | None = None,
        on_wait: Callable[[str, float], None] | None = None,
        contended_batch_tokens: int | None = None,
    ):
        self.score_fn = score_fn
        self.packed = packed  # packed rows instead of padded micro-batches (score_fn then unused)
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self.max_queue_tokens = max_queue_tokens  # None: items alone bound the queue
        self.max_padding = max_padding
        # A window spans several micro-batches so that sorting has neighbours of similar
        # length to group (less padding); its micro-batches still respect the budget.
        # Packed: a few rows' worth, so first-fit decreasing has items to fill each row with.
        self.window_tokens = WINDOW_BATCHES * (packed.row_tokens if packed is not None else max_batch_tokens)
        self.cross_request = cross_request
        self.on_batch = on_batch
        self._runs: dict[str, _RunQueue] = {}  # waiting rows by run ("" = no run id)
        self._order: list[str] = []  # round-robin order of the runs with rows waiting
        self._queued_items = 0
        self._queued_tokens = 0
        self.fair = fair  # False: one FIFO queue whatever the run (a benchmark baseline)
        self.run_weights = dict(run_weights or {})
        self._clock = FairClock(self.run_weights)
        # A padded pass's budget while several runs compete (None: half of max_batch_tokens).
        self.contended_batch_tokens = contended_batch_tokens or max(max_batch_tokens // 2, 1)
        self._last_seen: dict[str, float] = {}  # run -> when it last submitted (contention)
        self.on_wait = on_wait  # (run, seconds a request waited before its first row was taken)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-worker", initializer=worker_init)
        # One pass at a time on the worker: the next is chosen when it is free, so a row that
        # arrives meanwhile competes for it (the hand-over costs well under 1 ms a pass).
        self._in_flight: asyncio.Semaphore | None = None

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def queued_by_run(self) -> dict[str, int]:
        """Rows waiting per run id (for /metrics)."""
        return {run: len(q.rows) for run, q in self._runs.items() if q.rows}

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._in_flight = asyncio.Semaphore(1)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="reward-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for queue in self._runs.values():
            for row in queue.rows:
                if not row.request.future.done():
                    row.request.future.set_exception(RuntimeError("the service is shutting down"))
        self._runs.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, rows: list[list[int]], run: str | None = None) -> list[float]:
        """Queue `rows` (non-empty token-id lists) for `run` and wait for their scores, in order.

        Cancelling the wait (the client hung up) takes the request's rows out of the queue."""
        if not rows:
            return []
        # An empty queue always admits, so one request larger than the bound is slow, not refused forever.
        waiting = self._queued_items
        if waiting and waiting + len(rows) > self.max_queue_items:
            raise QueueFullError(f"{waiting} items are waiting (max_queue_items {self.max_queue_items})")
        tokens = sum(len(r) for r in rows)
        if waiting and self.max_queue_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFullError(f"{self._queued_tokens} tokens are waiting (max_queue_tokens {self.max_queue_tokens})")
        request = _Request(rows, asyncio.get_running_loop().create_future())
        now = time.monotonic()
        key = (run or "") if self.fair else ""
        queue = self._runs.get(key)
        if queue is None:
            queue = self._runs[key] = _RunQueue()
            self._clock.join(key)
        if key not in self._order:
            self._order.append(key)
        self._last_seen[key] = now
        queue.rows.extend(_Row(request, i, now) for i in range(len(rows)))
        queue.tokens += tokens
        self._queued_items += len(rows)
        self._queued_tokens += tokens
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(key, request)
            raise

    def _drop(self, key: str, request: _Request) -> None:
        """Take a cancelled request's waiting rows out of its run's queue."""
        if not request.future.done():
            request.future.cancel()
        queue = self._runs.get(key)
        if queue is None:
            return
        mine = [r for r in queue.rows if r.request is request]
        if not mine:
            return
        queue.rows = collections.deque(r for r in queue.rows if r.request is not request)
        gone = sum(len(r.ids) for r in mine)
        queue.tokens -= gone
        self._queued_items -= len(mine)
        self._queued_tokens -= gone
        if not queue.rows:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._runs.pop(key, None)
        if key in self._order:
            self._order.remove(key)

    def _oldest_arrival(self) -> float:
        return min(q.rows[0].arrival for q in self._runs.values() if q.rows)

    def _contended(self, now: float, window: list[tuple[str, _Row]]) -> bool:
        """More than one run has rows waiting (in the queues or this window) or sent work within
        CONTENTION_S: a heavy run's one big request may have been sent long ago."""
        for run in [r for r, t in self._last_seen.items() if now - t > CONTENTION_S]:
            del self._last_seen[run]
        active = set(self._last_seen) | {k for k, q in self._runs.items() if q.rows} | {k for k, _ in window}
        return len(active) > 1

    # ------------------------------------------------------------------ collector

    def _take_window(self) -> list[tuple[str, _Row]]:
        """Rows up to the window's token budget: first the head row of the run whose turn it is
        (FairClock), then the rest by deficit round-robin across runs (naive mode: one request's
        rows, runs taking turns)."""
        queues = {k: q.rows for k, q in self._runs.items()}
        if self.cross_request:
            waiting = [k for k in self._order if queues[k]]
            if not waiting:
                return []
            leader = self._clock.pick(waiting)
            head = queues[leader].popleft()
            deficits = {k: q.deficit for k, q in self._runs.items()}
            quantum = max(self.max_batch_tokens // max(len(self._order), 1), 1)
            taken = [(leader, head)] + deficit_round_robin(
                queues, deficits, self.run_weights, quantum, self.window_tokens - len(head.ids),
                lambda row: len(row.ids), self._order)
            for key, value in deficits.items():
                self._runs[key].deficit = value
        elif not self._order:
            return []
        else:
            key = self._order[0]
            self._order.append(self._order.pop(0))
            first = queues[key][0].request
            taken = []
            while queues[key] and queues[key][0].request is first:
                taken.append((key, queues[key].popleft()))
        window: list[tuple[str, _Row]] = []
        for key, row in taken:
            queue = self._runs[key]
            queue.tokens -= len(row.ids)
            self._queued_items -= 1
            self._queued_tokens -= len(row.ids)
            if not row.request.future.done():
                window.append((key, row))
        for key in [k for k, q in self._runs.items() if not q.rows]:
            self._forget(key)
        return window

    def _put_back(self, rows: list[tuple[str, _Row]]) -> None:
        """Rows taken for a look-ahead but not run yet: back to the front of their runs' queues,
        in their order, with their deficit refunded."""
        by_run: dict[str, list[_Row]] = {}
        for key, row in rows:
            by_run.setdefault(key, []).append(row)
        for key, mine in by_run.items():
            queue = self._runs.get(key)
            if queue is None:
                queue = self._runs[key] = _RunQueue()
                self._clock.join(key)
            if key not in self._order:
                self._order.insert(0, key)
            queue.rows.extendleft(reversed(mine))
            tokens = sum(len(r.ids) for r in mine)
            queue.tokens += tokens
            queue.deficit += tokens
            self._queued_items += len(mine)
            self._queued_tokens += tokens

    def _next_batch(self, window: list[tuple[str, _Row]]) -> list[_Row]:
        """One forward pass's rows out of a look-ahead `window`; the rest go back to their queues.

        The look-ahead spans several passes so rows of similar length can share one (less
        padding), but only one pass is handed to the worker at a time: a light run's row that
        arrives meanwhile waits for at most the pass that is running, not for a whole window.
        The pass chosen is the one holding the window's first row (the run whose turn it is);
        while runs compete it is planned under the smaller contended budget.
        """
        rows = [r for _, r in window]
        lengths = [len(r.ids) for r in rows]
        now = time.monotonic()
        if self.packed is not None:
            groups = [[s.index for s in row.items]
                      for row in plan_packed_rows(lengths, self.packed.row_tokens, self.packed.buckets).rows]
        else:
            budget = self.contended_batch_tokens if self.fair and self._contended(now, window) else self.max_batch_tokens
            groups = plan_micro_batches(lengths, min(budget, self.max_batch_tokens), self.max_padding)
        chosen = next(g for g in groups if 0 in g)
        keep = set(chosen)
        self._put_back([w for i, w in enumerate(window) if i not in keep])
        batch = [rows[i] for i in sorted(chosen)]
        served: dict[str, int] = {}
        for i in chosen:
            served[window[i][0]] = served.get(window[i][0], 0) + lengths[i]
        self._clock.served(window[0][0], served)
        self._clock.forget_idle(set(self._runs))
        for i in sorted(chosen):
            row = rows[i]
            if not row.request.started:
                row.request.started = True
                if self.on_wait is not None:
                    self.on_wait(window[i][0], now - row.arrival)
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queued_items:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for a free slot first: rows keep arriving meanwhile, so the window grows.
            await self._in_flight.acquire()
            # Gather more requests for up to max_wait after the oldest one, unless the budget is full.
            while self.cross_request and self._queued_items and self._queued_tokens < self.window_tokens:
                remaining = self._oldest_arrival() + self.max_wait - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            window = self._take_window()
            if not window:
                self._in_flight.release()
                continue
            window = self._next_batch(window) if self.cross_request else [r for _, r in window]
            job = loop.run_in_executor(self._executor, self._run_window, window, loop)
            job.add_done_callback(lambda fut, window=window: self._finish(window, fut))

    def _run_window(self, window: list[_Row], loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: sorted micro-batches under the budget; each one's scores are handed
        to the event loop as soon as it is done, so short requests need not wait for the window."""
        lengths = [len(r.ids) for r in window]
        if self.packed is not None:
            self._run_packed(window, lengths, loop)
            return
        for batch in plan_micro_batches(lengths, self.max_batch_tokens, self.max_padding):
            t0 = time.perf_counter()
            out = self.score_fn([window[i].ids for i in batch])
            loop.call_soon_threadsafe(self._deliver, [window[i] for i in batch], out)
            if self.on_batch is not None:
                longest = max(lengths[i] for i in batch)
                real = sum(lengths[i] for i in batch)
                self.on_batch(BatchStats(len(batch), real, longest * len(batch), time.perf_counter() - t0))

    def _run_packed(self, window: list[_Row], lengths: list[int], loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: the window as packed rows, one forward pass each, delivered row by row."""
        plan = plan_packed_rows(lengths, self.packed.row_tokens, self.packed.buckets)
        ids = [r.ids for r in window]
        for row in plan.rows:
            t0 = time.perf_counter()
            out = self.packed.score_row(ids, row)
            loop.call_soon_threadsafe(self._deliver, [window[s.index] for s in row.items], out)
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(row.items), row.used, row.length, time.perf_counter() - t0))

    @staticmethod
    def _deliver(rows: list[_Row], scores: list[float]) -> None:
        """Event loop: hand each score to its request; a request resolves when all its rows are in."""
        for row, score in zip(rows, scores):
            request = row.request
            if request.future.done():  # cancelled meanwhile
                continue
            request.scores[row.index] = score
            request.left -= 1
            if request.left == 0:
                request.future.set_result(request.scores)

    def _finish(self, window: list[_Row], job: asyncio.Future) -> None:
        """Event loop, after the window: free the slot; on a failure, fail every unresolved request."""
        self._in_flight.release()
        error = job.exception() if not job.cancelled() else RuntimeError("scoring was cancelled")
        if error is None:
            return
        log.error("scoring failed: %r", error)
        for row in window:
            if not row.request.future.done():
                row.request.future.set_exception(error)
