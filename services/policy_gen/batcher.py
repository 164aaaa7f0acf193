"""Cross-request batching for the hf backend: gather concurrent requests, decode them together.

A collector task takes the first queued request, waits up to `max_wait_ms` for more (or
until `max_batch_size` sequences are gathered), and runs the batch on the ONE worker thread
that owns the model, so the event loop never blocks and adapter loads never race a decode.
Static batching: requests that arrive mid-batch wait for the next one. The queue is bounded
in requests, sequences and tokens (prompt + requested completion): one request for 1,000
sequences weighs what 1,000 one-sequence requests do. Queue full -> 503.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from services.common.http import APIError
from services.policy_gen.hf_engine import HFEngine, SeqResult, SeqSpec

T = TypeVar("T")


@dataclass
class _Job:
    specs: list[SeqSpec]
    future: asyncio.Future


class GenerationBatcher:
    def __init__(
        self, engine: HFEngine, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
        max_queue_sequences: int | None = None, max_queue_tokens: int | None = None,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_sequences = max_queue_sequences
        self.max_queue_tokens = max_queue_tokens
        self.queued_sequences = 0
        self.queued_tokens = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-gen-engine")
        self.queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # for metrics/tests: how many decode batches ran
        self.on_batch: Callable[[int, float], None] | None = None  # (sequences, seconds)

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.worker.shutdown(wait=True, cancel_futures=True)

    async def run_exclusive(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the engine thread, between batches (adapter load/unload)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def submit(self, specs: list[SeqSpec]) -> list[SeqResult]:
        assert self.queue is not None, "batcher not started"
        tokens = sum(len(s.prompt_ids) + s.max_tokens for s in specs)
        self._refuse_if_full(len(specs), tokens)
        job = _Job(specs, asyncio.get_running_loop().create_future())
        self.queued_sequences += len(specs)
        self.queued_tokens += tokens
        await self.queue.put(job)
        try:
            return await job.future
        finally:
            self.queued_sequences -= len(specs)
            self.queued_tokens -= tokens

    def _refuse_if_full(self, sequences: int, tokens: int) -> None:
        """503 when admitting this job would pass a bound. An idle queue admits anything the
        per-request limits allowed, so a large request is slow, never refused forever."""
        if self.queue.qsize() >= self.max_queue:
            what, value, limit = "max_queue (requests)", self.queue.qsize() + 1, self.max_queue
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

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].specs)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.specs)
            await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        # Jobs whose client went away are dropped before paying for their decode.
        jobs = [j for j in jobs if not j.future.done()]
        if not jobs:
            return
        specs = [s for j in jobs for s in j.specs]
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.worker, self.engine.generate, specs)
        except Exception as exc:  # one bad batch must not kill the collector
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        self.batches += 1
        if self.on_batch:
            self.on_batch(len(specs), time.perf_counter() - t0)
        at = 0
        for j in jobs:
            mine = results[at : at + len(j.specs)]
            at += len(j.specs)
            if j.future.done():
                continue
            failed = next((r for r in mine if isinstance(r, LookupError)), None)
            if failed is not None:
                j.future.set_exception(
                    APIError(404, f"The model `{failed.args[0]}` does not exist.", type="NotFoundError", param="model")
                )
            else:
                j.future.set_result(mine)
