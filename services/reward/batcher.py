"""Cross-request dynamic batching: many small requests -> few length-sorted forward passes.

Requests put their token-id rows on an asyncio-side queue and await one future. A collector
task waits up to `max_wait_ms` (or until a window's worth of tokens is queued), takes a
window of rows in arrival order, sorts it by length and cuts it into micro-batches whose
padded size (rows x longest row) stays under `max_batch_tokens` and whose padding stays
under `max_padding` -- padding waste is what makes naive batching slow. Forward passes run
on ONE dedicated worker thread so the event loop never blocks; a request's rows may land in
different micro-batches and are reassembled in order.

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


class QueueFullError(Exception):
    """The queue bound is reached; the route answers 503 with Retry-After."""


@dataclass
class _Request:
    """One caller's rows; `future` resolves with their scores, in the caller's order."""

    rows: list[list[int]]
    future: asyncio.Future
    scores: list[float | None] = field(init=False)
    left: int = field(init=False)

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
        self._queue: collections.deque[_Row] = collections.deque()
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-worker", initializer=worker_init)
        # One window running on the worker and one already formed keeps the worker busy
        # between windows without letting the in-flight set grow unbounded.
        self._in_flight: asyncio.Semaphore | None = None

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._in_flight = asyncio.Semaphore(2)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="reward-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for row in self._queue:
            if not row.request.future.done():
                row.request.future.set_exception(RuntimeError("the service is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, rows: list[list[int]]) -> list[float]:
        """Queue `rows` (non-empty token-id lists) and wait for their scores, in order."""
        if not rows:
            return []
        # An empty queue always admits, so one request larger than the bound is slow, not refused forever.
        if self._queue and len(self._queue) + len(rows) > self.max_queue_items:
            raise QueueFullError(f"{len(self._queue)} items are waiting (max_queue_items {self.max_queue_items})")
        tokens = sum(len(r) for r in rows)
        if self._queue and self.max_queue_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFullError(f"{self._queued_tokens} tokens are waiting (max_queue_tokens {self.max_queue_tokens})")
        request = _Request(rows, asyncio.get_running_loop().create_future())
        now = time.monotonic()
        self._queue.extend(_Row(request, i, now) for i in range(len(rows)))
        self._queued_tokens += tokens
        self._wakeup.set()
        return await request.future  # cancellation (client gone) just drops the future

    # ------------------------------------------------------------------ collector

    def _take_window(self) -> list[_Row]:
        """Rows in arrival order up to the window's token budget (naive mode: one request's rows)."""
        window: list[_Row] = []
        tokens = 0
        while self._queue:
            row = self._queue[0]
            if row.request.future.done():  # cancelled by a disconnected client: skip its rows
                self._queue.popleft()
                self._queued_tokens -= len(row.ids)
                continue
            if not self.cross_request and window and row.request is not window[0].request:
                break
            if self.cross_request and window and tokens + len(row.ids) > self.window_tokens:
                break
            self._queue.popleft()
            self._queued_tokens -= len(row.ids)
            tokens += len(row.ids)
            window.append(row)
        return window

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for a free slot first: rows keep arriving meanwhile, so the window grows.
            await self._in_flight.acquire()
            # Gather more requests for up to max_wait after the oldest one, unless the budget is full.
            while self.cross_request and self._queue and self._queued_tokens < self.window_tokens:
                remaining = self._queue[0].arrival + self.max_wait - time.monotonic()
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
