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
adapter, the sync waits for one while the step's deadline (`run.step_timeout_s`) lasts, then
the step fails. Waits for a free adapter slot draw on the same deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import httpx
import openai

from services.common.identity import run_headers
from trainer.clients.policy import AdapterTableFull, PolicyClient
from trainer.clients.wait import ServicesNotReady, is_ready
from trainer.config_io import ConfigError
from trainer.ppo.config import PPOConfig
from trainer.ppo.deadline import StepDeadline

log = logging.getLogger("crs_rlhf.ppo")


class NoReplicaHoldsAdapter(ServicesNotReady):
    """Within the step's deadline (run.step_timeout_s), not one policy_gen replica took the step's adapter
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


def _client(cfg: PPOConfig, url: str, step: int, adapter: str | None, *, timeout_s: float | None = None,
            attempts: int = 6) -> PolicyClient:
    s = cfg.services
    return PolicyClient(url, model="", api_key=s.api_key, timeout_s=timeout_s or s.timeout_s, max_attempts=attempts,
                        headers=run_headers(cfg.run_id, step, adapter))


def _is_request_error(e: BaseException) -> bool:
    """A refusal every replica would repeat (bad path, full table): retrying elsewhere cannot help."""
    return isinstance(e, AdapterTableFull) or (isinstance(e, openai.APIStatusError) and 400 <= e.status_code < 500)


async def _sync_one(cfg: PPOConfig, url: str, path: str, name: str, previous: str | None, stale_prefix: str | None,
                    step: int, deadline: StepDeadline) -> _Outcome:
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
            await load_waiting_for_a_slot(client, path, name, deadline)
        # It missed a sync: it held neither the previous adapter nor (already) this one.
        return _Outcome(url, resynced=previous is not None and previous not in held and name not in held)
    except Exception as e:  # noqa: BLE001 - any failure takes this replica out; the report says which
        message = e.message if isinstance(e, openai.APIStatusError) else str(e) or type(e).__name__
        return _Outcome(url, e, f"loading {name} failed: {type(e).__name__}: {message}")


async def load_waiting_for_a_slot(client: PolicyClient, path: str, name: str, deadline: StepDeadline) -> None:
    """load_adapter, retried with backoff (0.5 s → 10 s) while the replica's adapter table is full
    and the step's deadline lasts."""
    delay = 0.5
    while True:
        try:
            return await client.load_adapter(path, name)
        except AdapterTableFull as e:
            left = deadline.left()
            if left <= 0:
                raise AdapterTableFull(
                    f"{e}; waited for a free slot until the step's deadline ({deadline}). Each trainer sharing this "
                    "policy_gen holds one adapter: start it with --max-loras >= the number of trainers") from None
            log.warning("policy_gen %s: adapter table is full (another trainer is syncing?); retrying %s in %.1fs",
                        client.base_url, name, delay)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


def sync_adapter(cfg: PPOConfig, path: str, name: str, previous: str | None = None, *, step: int = 0,
                 stale_prefix: str | None = None, deadline: StepDeadline | None = None) -> SyncReport:
    """Load adapter `path` as `name` into every replica of services.policy_urls (see the module docstring).

    `previous` is unloaded first; `stale_prefix` (the run's `<tag>-step-`) also unloads any older
    adapter of this run a replica still holds after missing syncs. Raises the replicas' own error
    when every one refused the request alike (a 4xx: e.g. a path outside --adapter-root), and
    NoReplicaHoldsAdapter when none took it before `deadline` (the step's; default: a fresh
    run.step_timeout_s).
    """
    urls = cfg.services.policy_urls
    deadline = deadline or StepDeadline(cfg.run.step_timeout_s)

    async def attempt() -> list[_Outcome]:
        return list(await asyncio.gather(*(_sync_one(cfg, u, path, name, previous, stale_prefix, step, deadline)
                                           for u in urls)))

    outcomes = asyncio.run(attempt())
    waited = False
    while not any(o.error is None for o in outcomes):
        if all(_is_request_error(o.error) for o in outcomes):
            raise outcomes[0].error
        if deadline.spent:
            whys = "; ".join(f"{o.url}: {o.why}" for o in outcomes)
            raise NoReplicaHoldsAdapter(
                f"no policy_gen replica holds adapter {name} within the step's deadline ({deadline}): {whys}. "
                "Start or fix the replicas in services.policy_urls")
        if not waited:
            log.warning("no policy_gen replica took adapter %s; waiting up to %.0f s (%s) for one", name, deadline.left(),
                        deadline)
            waited = True
        time.sleep(min(2.0, deadline.left()))
        outcomes = asyncio.run(attempt())
    report = SyncReport(name, [o.url for o in outcomes if o.error is None],
                        {o.url: o.why for o in outcomes if o.error is not None}, [o.url for o in outcomes if o.resynced])
    for url, why in report.out.items():
        log.warning("policy_gen replica %s is out of rotation: %s (retried at the next step once it answers /ready)", url, why)
    for url in report.resynced:
        log.info("policy_gen replica %s is back in rotation: resynced to %s", url, name)
    return report


def wait_for_a_replica(cfg: PPOConfig, deadline: StepDeadline | None = None, poll_s: float = 2.0) -> str:
    """Block until any replica answers /ready (while the step's deadline lasts); returns its URL.
    Before redoing a step on the base model: one live replica is enough to generate."""
    urls = cfg.services.policy_urls
    deadline = deadline or StepDeadline(cfg.run.step_timeout_s)

    async def poll() -> str:
        async with httpx.AsyncClient(timeout=5.0) as probe:
            for attempt in itertools.count():
                states = await asyncio.gather(*(is_ready(probe, u) for u in urls))
                if ready := [u for u, (ok, _) in zip(urls, states) if ok]:
                    return ready[0]
                if deadline.spent:
                    whys = ", ".join(f"{u} ({why})" for u, (_, why) in zip(urls, states))
                    raise ServicesNotReady(f"no policy_gen replica ready within the step's deadline ({deadline}): "
                                           f"{whys}; start one or raise run.step_timeout_s")
                if attempt == 0:
                    log.warning("waiting for a policy_gen replica to answer /ready (%.0f s left of %s)", deadline.left(), deadline)
                await asyncio.sleep(min(poll_s, deadline.left()))

    return asyncio.run(poll())


def unload_stale_adapters(cfg: PPOConfig, prefix: str, *, timeout_s: float | None = None, attempts: int = 6) -> list[str]:
    """Unload adapters named `prefix*` that an earlier (interrupted) invocation of this run left
    in any replica. A replica that does not answer is skipped: a restarted one holds nothing."""
    async def unload(client: PolicyClient) -> list[str]:
        stale = [m for m in await client.models() if m.startswith(prefix)]
        for name in stale:
            await client.unload_adapter(name)
        return stale

    found = _on_every_replica(cfg, unload, timeout_s=timeout_s, attempts=attempts)
    for url, got in found.items():
        if isinstance(got, BaseException):
            log.warning("could not unload this run's old adapters from policy_gen %s: %s", url, got)
    return [name for got in found.values() if not isinstance(got, BaseException) for name in got]


def _on_every_replica(cfg: PPOConfig, fn, **client_kw) -> dict:
    """`await fn(client)` on every replica of services.policy_urls at once: url -> its result, or
    the exception it raised (each caller decides what a replica that failed means)."""
    async def one(url: str):
        async with _client(cfg, url, 0, None, **client_kw) as client:
            return await fn(client)

    async def every() -> dict:
        found = await asyncio.gather(*(one(u) for u in cfg.services.policy_urls), return_exceptions=True)
        return dict(zip(cfg.services.policy_urls, found))

    return asyncio.run(every())


def context_overflow(prompt_tokens: int, new_tokens: int, contexts: dict[str, int | None]) -> str | None:
    """Why a prompt of `prompt_tokens` plus a `new_tokens` completion does not fit every replica's
    context (url -> max_model_len, None when the server does not say), or None when it fits."""
    short = {url: n for url, n in contexts.items() if n is not None and prompt_tokens + new_tokens > n}
    if not short:
        return None
    where = ", ".join(f"{url} (max_model_len {n})" for url, n in short.items())
    return (f"generation.max_prompt_tokens {prompt_tokens} + generation.max_new_tokens {new_tokens} = "
            f"{prompt_tokens + new_tokens} tokens do not fit policy_gen at {where}: it would refuse the first "
            f"step that draws a prompt that long. Start policy_gen with --max-model-len >= "
            f"{prompt_tokens + new_tokens}, or lower generation.max_prompt_tokens / generation.max_new_tokens")


def check_context_window(cfg: PPOConfig) -> None:
    """Refuse, before step 1, a generation budget some replica cannot serve (ConfigError: exit 2).
    A replica that does not answer is left to the rollout's own retries."""
    found = _on_every_replica(cfg, PolicyClient.max_model_len, attempts=1)
    contexts = {url: None if isinstance(n, BaseException) else n for url, n in found.items()}
    g = cfg.generation
    problem = context_overflow(g.max_prompt_tokens, g.max_new_tokens, contexts)
    if problem:
        raise ConfigError(problem)


def release_adapter_slots(cfg: PPOConfig, prefix: str) -> None:
    """A run that ends, however it ends, frees its slot on every replica for the next trainer:
    the adapter stays on disk, and `--resume` loads it again. Best effort and quick (one try, a
    10 s timeout): a run is not failed, nor its failure delayed, because a replica is gone."""
    try:
        unload_stale_adapters(cfg, prefix, timeout_s=min(cfg.services.timeout_s, 10.0), attempts=1)
    except Exception as e:  # noqa: BLE001 - any failure here only costs a slot until the next start
        log.warning("could not unload this run's adapter from policy_gen: %s", e)


__all__ = ["NoReplicaHoldsAdapter", "SyncReport", "load_waiting_for_a_slot", "release_adapter_slots",
           "sync_adapter", "unload_stale_adapters", "wait_for_a_replica"]
