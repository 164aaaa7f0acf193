"""Which run leads the reward batcher's next pass (issue 25, item 1: reward_abs's ratio).

A light run's row must wait for at most the pass in flight: the policy (`FairClock`, start-time
fair queueing in tokens) is tested on hand-worked examples, then the real `DynamicBatcher` on
its own event loop and worker thread, with a scorer that records each pass.
"""

from __future__ import annotations

import asyncio
import threading
import time

import services.reward.batcher as batcher_module
from services.reward.batcher import DynamicBatcher, FairClock


def test_fair_clock_puts_a_newcomer_ahead_of_the_pass_in_flight_and_banks_no_idle_credit():
    c = FairClock()
    c.join("heavy")
    c.served("heavy", {"heavy": 2000})  # heavy's pass runs: heavy 2000, clock 0
    c.join("light")  # light arrives: starts at the clock (0), ahead of heavy
    assert c.pick(["heavy", "light"]) == "light"
    c.served("light", {"light": 50})  # clock 0, light 50
    assert c.pick(["heavy", "light"]) == "light"  # still behind heavy's 2000 tokens
    c.served("light", {"light": 2000})  # light 2050: heavy's turn
    assert c.pick(["heavy", "light"]) == "heavy"
    c.served("heavy", {"heavy": 1000})  # clock moves to heavy's tag, 2000
    assert c.now == 2000 and c.tags == {"heavy": 3000, "light": 2050}
    # light goes idle; once the clock passes its tag, its tag is dropped and a return starts at the clock.
    c.served("heavy", {"heavy": 1000})  # clock 3000, heavy 4000
    c.forget_idle({"heavy"})
    assert c.tags == {"heavy": 4000}
    c.join("light")
    assert c.tags["light"] == 3000 and c.pick(["heavy", "light"]) == "light"


def test_fair_clock_weights_divide_the_tokens_served():
    c = FairClock({"a": 3.0})
    c.join("a")
    c.join("b")
    order = []
    for _ in range(8):  # every pass 100 tokens of its leader
        run = c.pick(["a", "b"])
        order.append(run)
        c.served(run, {run: 100})
    assert order == ["a", "b", "a", "a", "a", "b", "a", "a"]  # 3:1 (a's tag grows 33.3 per pass, b's 100)


class _Recorder:
    """A scorer that takes `seconds_per_pass` and records each pass's row lengths."""

    def __init__(self, seconds_per_pass: float):
        self.seconds = seconds_per_pass
        self.passes: list[list[int]] = []
        self.started = threading.Event()

    def __call__(self, rows):
        self.passes.append(sorted(len(r) for r in rows))
        self.started.set()
        time.sleep(self.seconds)
        return [float(len(r)) for r in rows]


async def _light_behind_heavy(batcher: DynamicBatcher, scorer: _Recorder) -> None:
    batcher.start()
    try:
        heavy = asyncio.ensure_future(batcher.submit([[1] * 1000 for _ in range(12)], run="heavy"))
        while not scorer.started.is_set():
            await asyncio.sleep(0.001)
        light = await batcher.submit([[2] * 50], run="light")  # arrives while heavy's first pass runs
        assert light == [50.0]
        await heavy
    finally:
        await batcher.stop()


def test_a_light_row_waits_for_the_pass_in_flight_only():
    """Heavy has 12 rows of 1,000 tokens queued (a look-ahead window of 4 budgets holds 8 of them).
    A light row arriving during heavy's first pass must lead the second pass. Before FairClock
    the pass was the one holding the window's first row, a heavy row after a put-back."""
    scorer = _Recorder(0.05)
    batcher = DynamicBatcher(scorer, max_batch_tokens=2048, max_padding=0.05, max_wait_ms=1)
    asyncio.run(_light_behind_heavy(batcher, scorer))
    assert scorer.passes[1] == [50], scorer.passes[:3]


def test_passes_shrink_while_runs_compete_and_fill_the_budget_when_one_run_is_alone(monkeypatch):
    monkeypatch.setattr(batcher_module, "CONTENTION_S", 0.25)
    scorer = _Recorder(0.05)
    batcher = DynamicBatcher(scorer, max_batch_tokens=2048, max_padding=0.05, max_wait_ms=1)

    async def light_after_seven_heavy_passes() -> None:
        batcher.start()
        try:
            heavy = asyncio.ensure_future(batcher.submit([[1] * 1000 for _ in range(24)], run="heavy"))
            while len(scorer.passes) < 7:  # heavy's request was sent > CONTENTION_S ago (7 x 0.05 s)
                await asyncio.sleep(0.001)
            await batcher.submit([[2] * 50], run="light")
            await heavy
        finally:
            await batcher.stop()

    asyncio.run(light_after_seven_heavy_passes())
    light = scorer.passes.index([50])
    # Heavy alone: 2 rows of 1,000 in the 2,048 budget. Once light shows up, heavy (still queued)
    # and light compete: the next heavy pass holds 1 row (the contended budget, 1,024).
    assert scorer.passes[:7] == [[1000, 1000]] * 7 and scorer.passes[light + 1] == [1000], scorer.passes

    alone = _Recorder(0.0)
    batcher = DynamicBatcher(alone, max_batch_tokens=2048, max_padding=0.05, max_wait_ms=1)

    async def heavy_only() -> None:
        batcher.start()
        try:
            await batcher.submit([[1] * 1000 for _ in range(6)], run="heavy")
        finally:
            await batcher.stop()

    asyncio.run(heavy_only())
    assert alone.passes == [[1000, 1000]] * 3
