"""Wait until the services a trainer needs answer `/ready`, with one generous deadline.

On a fresh cluster the trainer often starts first: vLLM takes minutes to load a 7B model, and
a driver that gives up after its first failed request (then tears its Ray cluster down) never
trains. So before step 1, and again before redoing a step after a service dropped out, the
driver polls every service's `/ready` (no API key needed) and logs who it is waiting for:

    waiting for policy_gen at http://policy-gen:8000 (2/3 ready, 35 s of 900 s)

`/ready` is ours (policy_gen, reward services); a plain OpenAI-compatible server without it
(e.g. vLLM's own `/health` only) counts as ready once `/health` answers 200.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger("crs_rlhf.wait")


class ServicesNotReady(RuntimeError):
    """A service did not become ready within the deadline (the message names each one)."""


@dataclass(frozen=True)
class Target:
    name: str  # "policy_gen", "reward_pref", ...
    url: str


async def is_ready(client: httpx.AsyncClient, url: str) -> tuple[bool, str]:
    try:
        r = await client.get(url.rstrip("/") + "/ready")
        if r.status_code == 404:  # not one of ours: fall back to the OpenAI-server convention
            r = await client.get(url.rstrip("/") + "/health")
        return r.status_code == 200, f"HTTP {r.status_code}"
    except httpx.HTTPError as e:
        return False, type(e).__name__


async def await_ready(targets: list[Target], deadline_s: float, *, poll_s: float = 2.0, log_every_s: float = 10.0) -> float:
    """Return the seconds waited once every target is ready; raise ServicesNotReady at the deadline."""
    if not targets:
        return 0.0
    t0 = time.monotonic()
    last_log = -log_every_s
    async with httpx.AsyncClient(timeout=min(10.0, max(poll_s, 1.0))) as client:
        while True:
            states = await asyncio.gather(*(is_ready(client, t.url) for t in targets))
            waiting = [(t, why) for t, (ok, why) in zip(targets, states) if not ok]
            elapsed = time.monotonic() - t0
            if not waiting:
                if elapsed > poll_s:
                    log.info("all %d services ready after %.0f s", len(targets), elapsed)
                return elapsed
            if elapsed >= deadline_s:
                names = ", ".join(f"{t.name} at {t.url} ({why})" for t, why in waiting)
                raise ServicesNotReady(
                    f"not ready after {deadline_s:.0f} s: {names}; start them or raise run.step_timeout_s")
            if elapsed - last_log >= log_every_s:
                last_log = elapsed
                who = ", ".join(f"{t.name} at {t.url}" for t, _ in waiting)
                log.info("waiting for %s (%d/%d ready, %.0f s of %.0f s)", who, len(targets) - len(waiting),
                         len(targets), elapsed, deadline_s)
            await asyncio.sleep(poll_s)


def wait_ready(targets: list[Target], deadline_s: float, **kw) -> float:
    return asyncio.run(await_ready(targets, deadline_s, **kw))


__all__ = ["ServicesNotReady", "Target", "await_ready", "wait_ready"]
