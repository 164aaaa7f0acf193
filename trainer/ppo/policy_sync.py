"""Each step's adapter into every policy_gen replica, before the next step's rollouts.

Two rules carry correctness:
1. **Rotation is "holds the current adapter".** Rollout workers ask each replica's
   /v1/models when a rollout starts and use only those listing the step's adapter
   (trainer.clients.policy_pool), so this sync alone decides who serves: nothing else has to
   be told, and a replica that restarted (and forgot the adapter) never serves a rollout
   until a sync has loaded the current adapter into it again.
2. **Per replica, the one-trainer slot rules stay.** Unload this run's older adapters, then
   load the new one, waiting for a free slot while `--max-loras` is full (other trainers'
   syncs): a trainer holds one slot on every replica.

All replicas sync concurrently. One that fails (down, not /ready, a failed load) is out of
rotation: one warning naming its URL and why, and `policy/replicas_out` in the step's row.
At each later step it is tried again once it answers /ready. If no replica holds the
adapter, the sync waits up to `services.wait_ready_s` for one, then the step fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx
import openai

from services.common.identity import run_headers
from trainer.clients.policy import AdapterTableFull, PolicyClient
from trainer.clients.wait import ServicesNotReady, is_ready
from trainer.ppo.config import PPOConfig

log = logging.getLogger("crs_rlhf.ppo")


class NoReplicaHoldsAdapter(ServicesNotReady):
    """After waiting services.wait_ready_s, not one policy_gen replica took the step's adapter
    (the message names each and why): a service failure, exit code 3 from `crs-rlhf train`."""


@dataclass
class SyncReport:
    adapter: str
    in_rotation: list[str]  # replica URLs that hold `adapter` now
    out: dict[str, str] = field(default_factory=dict)  # URL -> why it is out of rotation
    resynced: list[str] = field(default_factory=list)  # URLs back in rotation after missing a sync

    def metrics(self) -> dict[str, int]:
        return {"policy/replicas_in_rotation": len(self.in_rotation), "policy/replicas_out": len(self.out)}


@dataclass
class _Outcome:
    url: str
    error: BaseException | None = None  # None: it holds the adapter now
    why: str = ""
    resynced: bool = False


def _client(cfg: PPOConfig, url: str, step: int, adapter: str | None) -> PolicyClient:
    s = cfg.services
    return PolicyClient(url, model="", api_key=s.api_key, timeout_s=s.timeout_s,
                        headers=run_headers(cfg.run_id, step, adapter))


def _is_request_error(e: BaseException) -> bool:
    """A refusal every replica would repeat (bad path, full table): retrying elsewhere cannot help."""
    return isinstance(e, AdapterTableFull) or (isinstance(e, openai.APIStatusError) and 400 <= e.status_code < 500)


async def _sync_one(cfg: PPOConfig, url: str, path: str, name: str, previous: str | None, stale_prefix: str | None,
                    step: int) -> _Outcome:
    async with httpx.AsyncClient(timeout=5.0) as probe:
        ready, status = await is_ready(probe, url)
    if not ready:
        return _Outcome(url, ConnectionError(f"not ready ({status})"), f"not ready ({status})")
    try:
        async with _client(cfg, url, step, name) as client:
            held = await client.models()
            stale = [m for m in held if stale_prefix and m.startswith(stale_prefix) and m != name]
            stale += [previous] if previous and previous != name and previous not in stale and previous in held else []
            for old in stale:
                await client.unload_adapter(old)
            await load_waiting_for_a_slot(client, path, name, cfg.run.adapter_slot_wait_s)
        # It missed a sync: it held neither the previous adapter nor (already) this one.
        return _Outcome(url, resynced=previous is not None and previous not in held and name not in held)
    except Exception as e:  # noqa: BLE001 - any failure takes this replica out; the report says which
        message = e.message if isinstance(e, openai.APIStatusError) else str(e) or type(e).__name__
        return _Outcome(url, e, f"loading {name} failed: {type(e).__name__}: {message}")


async def load_waiting_for_a_slot(client: PolicyClient, path: str, name: str, wait_s: float) -> None:
    """load_adapter, retried with backoff (0.5 s → 10 s) while the replica's adapter table is full."""
    deadline, delay = time.monotonic() + wait_s, 0.5
    while True:
        try:
            return await client.load_adapter(path, name)
        except AdapterTableFull as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AdapterTableFull(
                    f"{e}; waited {wait_s:.0f}s (run.adapter_slot_wait_s) for a free slot. Each trainer sharing this "
                    "policy_gen holds one adapter: start it with --max-loras >= the number of trainers") from None
            log.warning("policy_gen %s: adapter table is full (another trainer is syncing?); retrying %s in %.1fs",
                        client.base_url, name, delay)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


def sync_adapter(cfg: PPOConfig, path: str, name: str, previous: str | None = None, *, step: int = 0,
                 stale_prefix: str | None = None) -> SyncReport:
    """Load adapter `path` as `name` into every replica of services.policy_urls (see the module docstring).

    `previous` is unloaded first; `stale_prefix` (the run's `<tag>-step-`) also unloads any older
    adapter of this run a replica still holds after missing syncs. Raises the replicas' own error
    when every one refused the request alike (a 4xx: e.g. a path outside --adapter-root), and
    NoReplicaHoldsAdapter when none took it within services.wait_ready_s.
    """
    urls, deadline = cfg.services.policy_urls, time.monotonic() + cfg.services.wait_ready_s

    async def attempt() -> list[_Outcome]:
        return list(await asyncio.gather(*(_sync_one(cfg, u, path, name, previous, stale_prefix, step) for u in urls)))

    outcomes = asyncio.run(attempt())
    waited = False
    while not any(o.error is None for o in outcomes):
        if all(_is_request_error(o.error) for o in outcomes):
            raise outcomes[0].error
        if time.monotonic() >= deadline:
            whys = "; ".join(f"{o.url}: {o.why}" for o in outcomes)
            raise NoReplicaHoldsAdapter(
                f"no policy_gen replica holds adapter {name} after {cfg.services.wait_ready_s:.0f} s "
                f"(services.wait_ready_s): {whys}. Start or fix the replicas in services.policy_urls")
        if not waited:
            log.warning("no policy_gen replica took adapter %s; waiting up to %.0f s for one", name, cfg.services.wait_ready_s)
            waited = True
        time.sleep(2.0)
        outcomes = asyncio.run(attempt())
    report = SyncReport(name, [o.url for o in outcomes if o.error is None],
                        {o.url: o.why for o in outcomes if o.error is not None}, [o.url for o in outcomes if o.resynced])
    for url, why in report.out.items():
        log.warning("policy_gen replica %s is out of rotation: %s (retried at the next step once it answers /ready)", url, why)
    for url in report.resynced:
        log.info("policy_gen replica %s is back in rotation: resynced to %s", url, name)
    return report


def wait_for_a_replica(cfg: PPOConfig, poll_s: float = 2.0) -> str:
    """Block until any replica answers /ready (up to services.wait_ready_s); returns its URL.
    Before redoing a step on the base model: one live replica is enough to generate."""
    urls, deadline = cfg.services.policy_urls, time.monotonic() + cfg.services.wait_ready_s

    async def poll() -> str:
        async with httpx.AsyncClient(timeout=5.0) as probe:
            while True:
                states = await asyncio.gather(*(is_ready(probe, u) for u in urls))
                if ready := [u for u, (ok, _) in zip(urls, states) if ok]:
                    return ready[0]
                if time.monotonic() >= deadline:
                    whys = ", ".join(f"{u} ({why})" for u, (_, why) in zip(urls, states))
                    raise ServicesNotReady(f"no policy_gen replica ready after {cfg.services.wait_ready_s:.0f} s: "
                                           f"{whys}; start one or raise services.wait_ready_s")
                await asyncio.sleep(poll_s)

    return asyncio.run(poll())


def unload_stale_adapters(cfg: PPOConfig, prefix: str) -> list[str]:
    """Unload adapters named `prefix*` that an earlier (interrupted) invocation of this run left
    in any replica. A replica that does not answer is skipped: a restarted one holds nothing."""
    async def one(url: str) -> list[str]:
        async with _client(cfg, url, 0, None) as client:
            stale = [m for m in await client.models() if m.startswith(prefix)]
            for name in stale:
                await client.unload_adapter(name)
            return stale

    async def every() -> list[str]:
        found = await asyncio.gather(*(one(u) for u in cfg.services.policy_urls), return_exceptions=True)
        for url, got in zip(cfg.services.policy_urls, found):
            if isinstance(got, BaseException):
                log.warning("could not unload this run's old adapters from policy_gen %s: %s", url, got)
        return [name for got in found if not isinstance(got, BaseException) for name in got]

    return asyncio.run(every())


def release_adapter_slots(cfg: PPOConfig, prefix: str) -> None:
    """A finished (or interrupted) run frees its slot on every replica for the next trainer: the
    adapter stays on disk, and `--resume` loads it again. Best effort: a run that trained is not
    failed because a replica went away at the end."""
    try:
        unload_stale_adapters(cfg, prefix)
    except Exception as e:  # noqa: BLE001 - any failure here only costs a slot until the next start
        log.warning("could not unload this run's adapter from policy_gen: %s", e)


__all__ = ["NoReplicaHoldsAdapter", "SyncReport", "load_waiting_for_a_slot", "release_adapter_slots",
           "sync_adapter", "unload_stale_adapters", "wait_for_a_replica"]
