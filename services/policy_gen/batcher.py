"""Fair continuous batching for the hf backend: runs share the decode batch, nobody waits out a
long request, and work nobody waits for is dropped.

Requests queue their sequences per run (the X-CRS-Run id; requests without one share a
queue). Between decode steps the scheduler (`plan`) fills free batch slots from the run with
the fewest running sequences for its weight, so runs interleave; when the batch is full and
a run with waiting work holds fewer slots than its fair share (max_batch_size x its weight /
the weights of the runs with work), the newest sequences of runs over their share are
preempted: they keep their tokens and generator and continue later (prompt and tokens so far
prefilled again). One run alone uses the whole batch.

The engine runs on ONE worker thread that owns the model (adapter loads go through the same
thread, between rounds, so they never race a decode). A caller that goes away (its `submit`
is cancelled) has its queued sequences removed and its running ones dropped at the next step.
The queue is bounded in requests, sequences and tokens (prompt + requested completion): queue
full -> 503.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from services.common.http import APIError
from services.policy_gen.hf_engine import HFEngine, Seq, SeqResult, SeqSpec, StepEvent

T = TypeVar("T")
EventFn = Callable[[StepEvent], None]


@dataclass(eq=False)
class _Job:
    run: str
    seqs: list[Seq]
    future: asyncio.Future
    arrival: float
    on_event: EventFn | None = None  # streaming: every token of every sequence, on the event loop
    left: int = 0
    waited: bool = False  # its first admission was reported to on_wait


@dataclass
class _Run:
    waiting: collections.deque = field(default_factory=collections.deque)  # Seq, in admission order
    running: int = 0


@dataclass(frozen=True)
class Plan:
    admit: list[Seq]
    preempt: list[Seq]


def fair_plan(
    runs: dict[str, tuple[int, int]], weights: dict[str, float], capacity: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """How many sequences to admit and to preempt per run. Pure.

    runs: run -> (running, waiting). Free slots go one at a time to the run with the fewest
    running sequences per weight among those with some waiting (ties: first in `runs`). When
    no slot is free, a run below its share (capacity x weight / total weight of runs with work,
    at least 1) takes slots from runs above theirs, newest first.

    >>> fair_plan({"heavy": (4, 10), "light": (0, 1)}, {}, 4)
    ({'light': 1}, {'heavy': 1})
    >>> fair_plan({"heavy": (2, 10), "light": (0, 1)}, {}, 4)
    ({'light': 1, 'heavy': 1}, {})
    >>> fair_plan({"a": (0, 9)}, {}, 4)
    ({'a': 4}, {})
    """
    running = {r: n for r, (n, _) in runs.items()}
    waiting = {r: w for r, (_, w) in runs.items()}
    w = {r: weights.get(r, 1.0) for r in runs}
    total = sum(w[r] for r in runs if running[r] or waiting[r]) or 1.0
    share = {r: max(1, int(capacity * w[r] / total)) for r in runs}
    admit: dict[str, int] = {}
    preempt: dict[str, int] = {}
    free = capacity - sum(running.values())
    spare = max(free, 0)  # free slots not yet promised to a run below its share
    # Runs below their share get free slots first, then slots taken from runs above theirs.
    for r in sorted(runs, key=lambda r: running[r] / w[r]):
        need = min(share[r] - running[r], waiting[r])
        take = min(max(need, 0), spare)
        spare -= take
        need -= take
        while need > 0:
            donors = [d for d in runs if running[d] - preempt.get(d, 0) > share[d]]
            if not donors:
                break
            d = max(donors, key=lambda d: (running[d] - preempt.get(d, 0)) / w[d])
            preempt[d] = preempt.get(d, 0) + 1
            free += 1
            need -= 1
    load = {r: running[r] - preempt.get(r, 0) for r in runs}
    left = dict(waiting)
    while free > 0:
        ready = [r for r in runs if left[r] > 0]
        if not ready:
            break
        r = min(ready, key=lambda r: load[r] / w[r])
        admit[r] = admit.get(r, 0) + 1
        load[r] += 1
        left[r] -= 1
        free -= 1
    return admit, preempt


class GenerationBatcher:
    def __init__(
        self, engine: HFEngine, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
        max_queue_sequences: int | None = None, max_queue_tokens: int | None = None,
        run_weights: dict[str, float] | None = None, fair: bool = True,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_sequences = max_queue_sequences
        self.max_queue_tokens = max_queue_tokens
        self.run_weights = dict(run_weights or {})
        self.fair = fair  # False: one first-come-first-served queue, no preemption (a benchmark baseline)
        self.queued_requests = 0
        self.queued_sequences = 0
        self.queued_tokens = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-gen-engine")
        self._runs: dict[str, _Run] = {}
        self._running: dict[int, Seq] = {}  # id(seq) -> seq, admitted and not finished
        self._admitted = itertools.count()  # admission order: the newest are preempted first
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # for metrics/tests: how many scheduling rounds ran
        self.on_batch: Callable[[int, float], None] | None = None  # (sequences, seconds) per round
        self.on_wait: Callable[[str, float], None] | None = None  # (run, seconds before its first sequence ran)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="policy-gen-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.worker.shutdown(wait=True, cancel_futures=True)

    async def run_exclusive(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the engine thread, between rounds (adapter load/unload)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def queued_by_run(self) -> dict[str, int]:
        """Sequences waiting to start, per run id (for /metrics)."""
        return {run: len(r.waiting) for run, r in self._runs.items() if r.waiting}

    async def submit(self, specs: list[SeqSpec], run: str | None = None, on_event: EventFn | None = None) -> list[SeqResult]:
        """Generate `specs` for `run`; results in order. `on_event` sees every step (streaming).
        Cancelling the wait (the client hung up) drops the request's sequences."""
        assert self._wakeup is not None, "batcher not started"
        tokens = sum(len(s.prompt_ids) + s.max_tokens for s in specs)
        self._refuse_if_full(len(specs), tokens)
        loop = asyncio.get_running_loop()
        job = _Job((run or "") if self.fair else "", [], loop.create_future(), time.monotonic(), on_event, len(specs))
        job.seqs = [self.engine.new_seq(s, job, i) for i, s in enumerate(specs)]
        self._runs.setdefault(job.run, _Run()).waiting.extend(job.seqs)
        self.queued_requests += 1
        self.queued_sequences += len(specs)
        self.queued_tokens += tokens
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        finally:
            self.queued_requests -= 1
            self.queued_sequences -= len(specs)
            self.queued_tokens -= tokens

    def _refuse_if_full(self, sequences: int, tokens: int) -> None:
        """503 when admitting this job would pass a bound. An idle queue admits anything the
        per-request limits allowed, so a large request is slow, never refused forever."""
        if self.queued_requests >= self.max_queue:
            what, value, limit = "max_queue (requests)", self.queued_requests + 1, self.max_queue
        elif self.queued_sequences == 0:
            return
        elif self.max_queue_sequences and self.queued_sequences + sequences > self.max_queue_sequences:
            what, value, limit = "max_queue_sequences", self.queued_sequences + sequences, self.max_queue_sequences
        elif self.max_queue_tokens and self.queued_tokens + tokens > self.max_queue_tokens:
            what, value, limit = "max_queue_tokens", self.queued_tokens + tokens, self.max_queue_tokens
        else:
            return
        message = f"policy_gen is overloaded: {value} queued would exceed {what} {limit}; retry later"
        raise APIError(503, message, headers={"Retry-After": "1"})

    # ------------------------------------------------------------------ scheduling (event loop)

    def _cancel(self, job: _Job) -> None:
        """Nobody waits for `job` any more: unqueue its sequences, have the engine drop running ones."""
        if not job.future.done():
            job.future.cancel()
        mine = {id(s) for s in job.seqs}
        for seq in job.seqs:
            seq.cancelled = True  # read by the engine thread at the start of its next round
            if self._running.pop(id(seq), None) is not None:
                self._runs[job.run].running -= 1
        run = self._runs.get(job.run)
        if run is not None:
            run.waiting = collections.deque(s for s in run.waiting if id(s) not in mine)
            self._forget_if_idle(job.run)

    def _forget_if_idle(self, key: str) -> None:
        run = self._runs.get(key)
        if run is not None and not run.waiting and run.running <= 0:
            del self._runs[key]

    def plan(self) -> Plan:
        counts = {k: (r.running, len(r.waiting)) for k, r in self._runs.items()}
        admit_n, preempt_n = fair_plan(counts, self.run_weights, self.max_batch_size)
        preempt: list[Seq] = []
        for key, n in preempt_n.items():
            run = self._runs[key]
            mine = sorted((s for s in self._running.values() if s.owner.run == key), key=lambda s: -s.admitted)[:n]
            for seq in mine:
                del self._running[id(seq)]
                run.running -= 1
                run.waiting.appendleft(seq)  # first in line when its run gets a slot again
            preempt += mine
        admit: list[Seq] = []
        now = time.monotonic()
        for key, n in admit_n.items():
            run = self._runs[key]
            for _ in range(n):
                seq = run.waiting.popleft()
                seq.admitted = next(self._admitted)
                self._running[id(seq)] = seq
                run.running += 1
                admit.append(seq)
                job: _Job = seq.owner
                if not job.waited:
                    job.waited = True
                    if self.on_wait is not None:
                        self.on_wait(job.run, now - job.arrival)
        return Plan(admit, preempt)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # (The engine may still hold rows of cancelled requests: one more round drops them.)
            if not self._running and not any(r.waiting for r in self._runs.values()) and not self.engine.groups:
                self._wakeup.clear()
                await self._wakeup.wait()
                # A burst of requests arriving together is prefilled together.
                await asyncio.sleep(self.max_wait_s)
            plan = self.plan()
            t0 = time.perf_counter()
            try:
                events = await loop.run_in_executor(self.worker, self.engine.iterate, plan.admit, plan.preempt)
            except Exception as exc:  # one bad round must not kill the scheduler: fail what was in it
                self._fail_all(exc)
                continue
            self.batches += 1
            if self.on_batch:
                self.on_batch(len(self._running), time.perf_counter() - t0)
            for event in events:
                self._deliver(event)

    def _deliver(self, event: StepEvent) -> None:
        seq = event.seq
        job: _Job = seq.owner
        if job.future.done() or seq.cancelled:
            return
        if event.error is not None:
            self._finish_seq(seq)
            if isinstance(event.error, LookupError):
                error = APIError(404, f"The model `{event.error.args[0]}` does not exist.", type="NotFoundError",
                                 param="model")
            else:
                error = event.error
            job.future.set_exception(error)
            self._cancel(job)
            return
        if job.on_event is not None:
            job.on_event(event)
        if event.finish is not None:
            self._finish_seq(seq)
            job.left -= 1
            if job.left == 0:
                job.future.set_result([s.result() for s in job.seqs])
                self._forget_if_idle(job.run)

    def _finish_seq(self, seq: Seq) -> None:
        if self._running.pop(id(seq), None) is not None:
            self._runs[seq.owner.run].running -= 1

    def _fail_all(self, exc: Exception) -> None:
        for seq in list(self._running.values()):
            job: _Job = seq.owner
            if not job.future.done():
                job.future.set_exception(exc)
            self._cancel(job)
        self.engine.groups.clear()
