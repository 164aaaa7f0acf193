"""Rollout workers: generate with the current adapter and score every completion on arrival.

A worker takes a slice of prompts, sends one /v1/completions request per prompt (n samples
each, all in flight together up to `max_concurrency`), and the moment a prompt's completions
come back sends them to both reward services at once (`asyncio.gather` of the two
requests). Scoring thus hides behind the generation of the other prompts; only the scoring
of the last completions is on the critical path (bench/ppo_step.py measures the gain).
A step either returns every sample with all its scores or raises: the clients retry
transient failures, and nothing here substitutes a default reward. With several policy_gen
replicas (services.policy_urls) requests go through a `PolicyPool`, on the replicas that hold
the step's adapter; each sample records the adapter version policy_gen reports for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.identity import run_headers
from trainer.clients.policy import Rollout, SamplingParams
from trainer.clients.policy_pool import PolicyPool
from trainer.clients.reward import RewardClient, messages_item
from trainer.ppo.config import PPOConfig
from trainer.ppo.experience import RolloutBatch, RolloutSample


@dataclass(frozen=True)
class PromptItem:
    index: int  # position in the run's prompt order (drives the sampling seed and resume checks)
    messages: list[dict]  # OpenAI-style conversation ending with the user turn


def _first_error(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class RolloutWorker:
    """Plain class (tests call it directly); `actors.RolloutActor` runs it inside Ray."""

    def __init__(self, cfg: PPOConfig, worker_index: int = 0):
        self.cfg = cfg
        self.worker_index = worker_index
        self.base_model: str | None = cfg.services.policy_model

    def _client_options(self, step: int, adapter: str | None, retry_s: float | None) -> dict:
        """What the reward clients and the policy pool both take from services.*: auth, timeouts,
        health-aware retries (for at most `retry_s`: what is left of the step's deadline), and the
        run's identity (shared servers count their load by run)."""
        s = self.cfg.services
        return {"api_key": s.api_key, "timeout_s": s.timeout_s,
                "retry_max_s": self.cfg.run.step_timeout_s if retry_s is None else retry_s,
                "retry_max_attempts": s.retry_max_attempts, "unhealthy_cooldown_s": s.unhealthy_cooldown_s,
                "headers": run_headers(self.cfg.run_id, step, adapter)}

    def _reward_client(self, urls: list[str], name: str, step: int, adapter: str | None,
                       retry_s: float | None = None) -> RewardClient:
        return RewardClient(urls, name=name, **self._client_options(step, adapter, retry_s))

    def _sampling(self, step: int, prompt_index: int) -> SamplingParams:
        g = self.cfg.generation
        # A seed per (run seed, prompt position): a resumed run samples what it would have.
        seed = (self.cfg.run.seed * 1_000_003 + prompt_index) % (2**31)
        return SamplingParams(
            max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            top_k=g.top_k if g.top_k > 0 else -1, seed=seed,
        )

    def rollout(self, prompts: Sequence[PromptItem], adapter: str | None, step: int, overlap: bool | None = None,
                retry_s: float | None = None) -> RolloutBatch:
        """Synchronous entry point (a Ray actor method): runs the async rollout to completion.
        `retry_s`: how long the clients may retry (the driver sends what is left of the step's
        deadline); None = run.step_timeout_s."""
        overlap = self.cfg.run.overlap_scoring if overlap is None else overlap
        return asyncio.run(self.arollout(prompts, adapter, step, overlap, retry_s))

    async def arollout(self, prompts: Sequence[PromptItem], adapter: str | None, step: int, overlap: bool = True,
                       retry_s: float | None = None) -> RolloutBatch:
        s, w = self.cfg.services, self.cfg.crs.weight
        pref = self._reward_client(s.reward_pref_urls, "reward_pref", step, adapter, retry_s) if w > 0 else None
        abs_ = self._reward_client(s.reward_abs_urls, "reward_abs", step, adapter, retry_s) if w < 1 else None
        policy = PolicyPool(s.policy_urls, model=self.base_model or "", **self._client_options(step, adapter, retry_s))
        try:
            if self.base_model is None:
                self.base_model = (await policy.models())[0]
            model = adapter or self.base_model
            # Only replicas that hold this step's adapter serve it: one that missed the driver's
            # sync (down, restarted) is back once a later sync has loaded the current adapter.
            await policy.use_replicas_with(model)
            return await self._run(policy, pref, abs_, prompts, model, step, overlap)
        finally:
            await policy.aclose()
            for c in (pref, abs_):
                if c is not None:
                    await c.aclose()

    async def _score(self, pref: RewardClient | None, abs_: RewardClient | None, prompt: PromptItem,
                     rollouts: list[Rollout]) -> list[tuple[float | None, float | None]]:
        items = [messages_item(prompt.messages, r.text) for r in rollouts]

        async def maybe(client):
            return None if client is None else await client.score(items)

        got_pref, got_abs = await asyncio.gather(maybe(pref), maybe(abs_))  # both services at once
        n = len(items)
        ps = got_pref.scores if got_pref else [None] * n
        as_ = got_abs.scores if got_abs else [None] * n
        return list(zip(ps, as_))

    async def _run(self, policy, pref, abs_, prompts, model, step, overlap) -> RolloutBatch:
        n = self.cfg.ppo.completions_per_prompt
        gate = asyncio.Semaphore(self.cfg.services.max_concurrency)
        t0 = time.perf_counter()
        gen_done: list[float] = []

        async def generate(p: PromptItem) -> list[Rollout]:
            async with gate:
                out = await policy.generate([p.messages], n=n, sampling=self._sampling(step, p.index), model=model)
            gen_done.append(time.perf_counter())
            return out

        async def generate_and_score(p: PromptItem):
            rollouts = await generate(p)
            return p, rollouts, await self._score(pref, abs_, p, rollouts)

        try:
            async with asyncio.TaskGroup() as tg:
                if overlap:
                    tasks = [tg.create_task(generate_and_score(p)) for p in prompts]
                else:
                    tasks = [tg.create_task(generate(p)) for p in prompts]
            if overlap:
                results = [t.result() for t in tasks]
            else:
                t_gen = time.perf_counter()
                async with asyncio.TaskGroup() as tg:
                    scored = [tg.create_task(self._score(pref, abs_, p, t.result())) for p, t in zip(prompts, tasks)]
                results = [(p, t.result(), sc.result()) for p, t, sc in zip(prompts, tasks, scored)]
        except BaseExceptionGroup as group:  # surface the cause, not the group wrapper
            raise _first_error(group) from None
        t_end = time.perf_counter()
        last_gen = max(gen_done) if gen_done else t0
        samples = []
        for p, rollouts, scores in results:
            for r, (rp, ra) in zip(rollouts, scores):
                if not r.response_token_ids:
                    raise RuntimeError(f"policy_gen returned an empty completion for prompt {p.index}")
                samples.append(RolloutSample(
                    prompt_index=p.index, prompt_ids=r.prompt_token_ids, response_ids=r.response_token_ids,
                    gen_logprobs=r.response_logprobs, response_text=r.text, finish_reason=r.finish_reason,
                    r_pref=rp, r_abs=ra, adapter=None if r.model == self.base_model else r.model,
                ))
        # Both keys always: an unused signal (w = 0 or 1) is None, so every metrics row has every key.
        retries = {"reward_pref": pref.failures if pref else None, "reward_abs": abs_.failures if abs_ else None,
                   "policy_gen": policy.failures}
        return RolloutBatch(
            samples=samples, time_generate=(last_gen if overlap else t_gen) - t0,
            time_score=t_end - (last_gen if overlap else t_gen), time_total=t_end - t0, retries=retries,
        )


def split_prompts(prompts: Sequence[PromptItem], parts: int) -> list[list[PromptItem]]:
    """Contiguous, near-equal slices (order preserved, so results concatenate back in order)."""
    k, r = divmod(len(prompts), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < r else 0)
        out.append(list(prompts[start:end]))
        start = end
    return [s for s in out if s]


__all__ = ["PromptItem", "RolloutWorker", "split_prompts"]
