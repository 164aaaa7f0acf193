"""The PPO training loop, top to bottom (CleanRL-style), driving Ray actors.

    for step in steps:
        rollouts  = workers generate + score (both reward services, on arrival)
        stats     = learner.train_step(rollouts)        # π_old recomputed → CRS → KL penalty → GAE → PPO epochs
        adapter   = learner.save_adapter(step)          # RUN/adapters/step-{k:06d}/, a new folder each step
        policy_sync.sync_adapter(adapter)               # into every policy_gen replica: the next rollouts use it
        metrics.log(step); checkpoint every K steps

Prompt order is a pure function of (seed, data position): each epoch over the prompts is a
fresh seeded permutation, so `--resume` continues at the checkpoint's position with no
prompt skipped or repeated, and step numbers continue from the checkpoint's step.

PPO's π_old is the learner's own recomputation of the rollouts' logprobs with the weights that
sampled them; policy_gen's logprobs only feed the logprob-gap check. Hence the one rule the
driver enforces: every sample of a step comes from the current adapter (stale ones are refused).
A step's failures are bounded by one deadline, `run.step_timeout_s` (trainer.ppo.deadline).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from trainer.clients.wait import Target, wait_ready
from trainer.config_io import dump_config
from trainer.ppo.actors import RolloutRefused, check_rollout_nodes, init_ray, make_rollout_workers, warn_loopback_urls
from trainer.ppo.checkpoint import checkpoint_dir, latest_checkpoint
from trainer.ppo.config import PPOConfig, pin_paths, run_tag  # run_tag: re-exported here too
from trainer.ppo.deadline import StepDeadline
from trainer.ppo.experience import RolloutBatch, drop_stale
from trainer.ppo.learner_group import cluster_view, start_learner
from trainer.ppo.metrics import MetricsLogger
from trainer.ppo.policy_sync import (
    NoReplicaHoldsAdapter,
    check_context_window,
    release_adapter_slots,
    sync_adapter,
    unload_stale_adapters,
    wait_for_a_replica,
)
from trainer.ppo.rollout import PromptItem, split_prompts
from trainer.ppo.signals import Interrupted, stop_on_signals

log = logging.getLogger("crs_rlhf.ppo")


class StepFailed(RuntimeError):
    """A step's rollout still failed when its deadline (`run.step_timeout_s`) was spent, or a
    service refused it (a service is down or broken)."""


@dataclass
class PromptSet:
    prompts: list[list[dict]]  # conversations, each ending with a user turn
    dropped: int  # prompts over generation.max_prompt_tokens (dropped, not cut: thesis)


@dataclass
class RunSummary:
    run_dir: str
    first_step: int  # first step run by this call (1 for a fresh run)
    last_step: int  # last completed step
    interrupted: bool
    num_prompts: int
    dropped_prompts: int
    metrics: list[dict] = field(default_factory=list)  # this call's rows of metrics.jsonl
    final_adapter: str | None = None
    exit_code: int = 0  # 130 after SIGINT, 143 after SIGTERM (checkpoint saved either way)


class PromptOrder:
    """Position → prompt index: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("no RL prompts left after filtering (check run.data_source and generation.max_prompt_tokens)")
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def __call__(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            perm = list(range(self.n))
            random.Random(self.seed * 7919 + epoch).shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch][i]


def load_prompts(cfg: PPOConfig) -> PromptSet:
    from transformers import AutoTokenizer

    from trainer.data import build_rl_prompt_split, fixture_path, load_oasst

    source = fixture_path() if cfg.run.data_source == "fixture" else cfg.run.data_source
    from trainer.lineage import warn_double_lora

    warn_double_lora(cfg.model.policy_path, "PPO policy")
    tok = AutoTokenizer.from_pretrained(cfg.model.policy_path)
    split = build_rl_prompt_split(load_oasst(source), cfg.run.prompts, tok, cfg.generation.max_prompt_tokens,
                                  data=str(source))
    return PromptSet(prompts=split.train, dropped=split.dropped_long)


def adapter_name(run_dir: Path, step: int) -> str:
    return f"{run_tag(run_dir)}-step-{step:06d}"


def _stale_prefix(cfg: PPOConfig) -> str:
    return run_tag(cfg.run_dir) + "-step-"  # every adapter name of this run starts so (adapter_name)


def service_targets(cfg: PPOConfig) -> list[Target]:
    """The services this run calls: every policy_gen replica, and each reward service its CRS weight uses."""
    s, w = cfg.services, cfg.crs.weight
    targets = [Target("policy_gen", u) for u in s.policy_urls]
    targets += [Target("reward_pref", u) for u in s.reward_pref_urls] if w > 0 else []
    targets += [Target("reward_abs", u) for u in s.reward_abs_urls] if w < 1 else []
    return targets


def _rollout(cfg: PPOConfig, workers: list, items: list[PromptItem], adapter: str | None, step: int,
             deadline: StepDeadline) -> RolloutBatch:
    """The step's rollout, redone until it is whole and fresh or the step's deadline is spent.

    Redone when a worker's slice failed for good (after its clients' own retries) or when a
    sample came from another adapter than `adapter` (refused as stale: the learner's schedule
    wants the full batch, from the policy it is about to update). Before each redo the services
    are given a chance to come back (`_recover`). A refusal (HTTP 4xx) fails the step at once.
    """
    stale_dropped, attempt, pause = 0, 0, 1.0
    while True:
        attempt += 1
        try:
            parts = _rollout_once(workers, items, adapter, step, deadline.left())
        except RolloutRefused as e:
            raise StepFailed(f"step {step}: a service refused the rollout (redoing it would not help): {e}") from None
        except ray.exceptions.RayError as e:  # a worker's error (RayTaskError) or a lost worker
            failure = _clean_error(str(e))
            if isinstance(e, ray.exceptions.RayActorError):  # Ray's text names an actor id, not where it was
                failure += f"; the cluster has {cluster_view()}: a lost rollout worker restarts on a node that is alive"
        else:
            failure, dropped = _stale_samples(parts, adapter)
            if failure is None:
                return _merge(parts, stale_dropped)
            stale_dropped += dropped
        if deadline.spent:
            raise StepFailed(f"step {step}: rollout failed after {attempt} attempts within {deadline}: {failure}")
        log.warning("step %d: rollout failed (%s); redoing it (%.0f s left of %s)", step, failure, deadline.left(), deadline)
        time.sleep(min(pause, deadline.left()))  # a failure that repeats at once must not spin
        pause = min(pause * 2, 30.0)
        _recover(cfg, adapter, step, deadline)


def _rollout_once(workers: list, items: list[PromptItem], adapter: str | None, step: int, retry_s: float) -> list[RolloutBatch]:
    """Every worker on its slice of the prompts, in parallel; a worker's clients retry for at most `retry_s`."""
    slices = split_prompts(items, len(workers))
    return ray.get([w.rollout.remote(s, adapter, step, None, retry_s) for w, s in zip(workers, slices)])


def _stale_samples(parts: list[RolloutBatch], adapter: str | None) -> tuple[str | None, int]:
    """(None, 0) when every sample came from `adapter`, else (why the batch is refused, how many were stale)."""
    generated = [s for p in parts for s in p.samples]
    _, dropped = drop_stale(generated, adapter)
    if not dropped:
        return None, 0
    got = sorted({s.adapter or "the base model" for s in generated if s.adapter != adapter})
    return (f"{dropped} of {len(generated)} rollouts came from {', '.join(got)}, not "
            f"{adapter or 'the base model'} (refused as stale)"), dropped


def _merge(parts: list[RolloutBatch], stale_dropped: int) -> RolloutBatch:
    """The workers' batches as one: samples in prompt order, the slowest worker's times, summed retries."""
    retries: dict[str, int | None] = {}
    for p in parts:
        for k, v in p.retries.items():  # None for a signal this run does not use
            retries[k] = None if v is None else (retries.get(k) or 0) + v
    return RolloutBatch([s for p in parts for s in p.samples], max(p.time_generate for p in parts),
                        max(p.time_score for p in parts), max(p.time_total for p in parts), retries, stale_dropped)


def _recover(cfg: PPOConfig, adapter: str | None, step: int, deadline: StepDeadline) -> None:
    """Before a redo: wait for the reward services' /ready, and load the current adapter again into
    every policy_gen replica (a restarted one has forgotten it and would answer 404), or for the
    base model wait for any replica to be ready. Each wait draws on the step's deadline."""
    # A service that restarted answers again only once its model is loaded.
    wait_ready([t for t in service_targets(cfg) if t.name != "policy_gen"], deadline.left())
    if adapter is None:
        wait_for_a_replica(cfg, deadline)
        return
    try:
        sync_adapter(cfg, str(cfg.run_dir / "adapters" / f"step-{step - 1:06d}"), adapter, None, step=step,
                     stale_prefix=_stale_prefix(cfg), deadline=deadline)
    except Exception as sync_error:  # noqa: BLE001 - the redo reports the real failure if this mattered
        log.warning("step %d: re-loading adapter %s failed: %s", step, adapter, sync_error)


def _clean_error(text: str) -> str:
    """An actor's error without the terminal colours of Ray's worker tracebacks."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def train(cfg: PPOConfig, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> RunSummary:
    """Run PPO up to cfg.run.steps; `on_step(row)` is called after each step's metrics row (progress bars)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    # The actors get this config too: pin every path as the driver resolved it, so a worker whose
    # cwd differs (another node) opens the same model, and computes the same run tag, adapter
    # names and X-CRS-Run id.
    cfg = pin_paths(cfg)
    data = load_prompts(cfg)
    order = PromptOrder(len(data.prompts), cfg.run.seed)
    prompts_per_step = cfg.ppo.batch_size // cfg.ppo.completions_per_prompt
    log.info("%d RL prompts (%d dropped as longer than %d tokens)", len(data.prompts), data.dropped, cfg.generation.max_prompt_tokens)

    resume = resume or cfg.run.resume == "auto"
    wait_ready(service_targets(cfg), cfg.run.step_timeout_s)  # a fresh cluster starts the trainer first
    check_context_window(cfg)  # before Ray and the learner: a budget policy_gen would refuse fails now
    started_ray = init_ray(cfg.ray)
    metrics: MetricsLogger | None = None
    summary = RunSummary(str(run_dir), 1, 0, False, len(data.prompts), data.dropped)
    stop = stop_on_signals()  # after ray.init, which sets a SIGTERM handler that would exit unsaved
    fired = stop.__enter__()
    learner = None  # a LearnerGroup: one handle for any learner.num_workers
    try:
        workers = make_rollout_workers(cfg)  # they start while the learner loads
        learner = start_learner(cfg, name=run_tag(run_dir))
        targets = service_targets(cfg)
        warn_loopback_urls([t.url for t in targets])
        check_rollout_nodes(workers, targets)
        ckpt = latest_checkpoint(run_dir) if resume else None
        progress = Progress()
        unload_stale_adapters(cfg, _stale_prefix(cfg))
        if ckpt is not None:
            state = learner.load_checkpoint(str(ckpt))
            progress = Progress(state["step"], state["data_position"], adapter_name(run_dir, state["step"]))
            path = run_dir / "adapters" / f"step-{progress.step:06d}"
            learner.save_adapter(str(path))  # rewrite: the folder may be pruned or newer
            sync_adapter(cfg, str(path), progress.adapter, None, step=progress.step, stale_prefix=_stale_prefix(cfg),
                         deadline=StepDeadline(cfg.run.step_timeout_s))
            log.info("resumed from %s: step %d, data position %d", ckpt, progress.step, progress.position)
        elif resume:
            log.info("resume: no checkpoint in %s, starting fresh", run_dir)
        elif latest_checkpoint(run_dir) is not None:
            log.warning("starting fresh in %s, which has checkpoints up to %s: its metrics are replaced "
                        "(pass --resume or set run.resume: auto to continue it)", run_dir, latest_checkpoint(run_dir).name)
        summary.first_step, summary.last_step = progress.step + 1, progress.step
        metrics = MetricsLogger.for_run(cfg, resume_step=progress.step)

        def checkpoint() -> None:
            state = {"step": progress.step, "data_position": progress.position}
            learner.save_checkpoint(str(checkpoint_dir(run_dir, progress.step)), state)

        pending: Pending | None = None  # a step whose update was sent to the learner
        try:
            while progress.step < cfg.run.steps:
                k, pos = progress.step + 1, progress.position
                items = [PromptItem(p, data.prompts[order(p)]) for p in range(pos, pos + prompts_per_step)]
                deadline = StepDeadline(cfg.run.step_timeout_s)  # for everything this step may wait on
                batch = _rollout(cfg, workers, items, progress.adapter, k, deadline)
                pending = Pending(k, learner.train_step_async(batch.samples), batch, items, deadline)
                _finish_step(cfg, learner, metrics, summary, pending, progress)
                if on_step is not None:
                    on_step(summary.metrics[-1])
                if progress.step % cfg.run.checkpoint_every == 0 or progress.step == cfg.run.steps:
                    checkpoint()
        except KeyboardInterrupt as interrupt:
            # Ctrl-C or SIGTERM: an update already sent to the learner is finished and counted
            # (its weights have moved), a rollout in progress is dropped; then checkpoint.
            summary.interrupted = True
            summary.exit_code = (interrupt.exit_code if isinstance(interrupt, Interrupted)
                                 else 128 + fired[0] if fired else 130)
            if pending is not None and progress.step < pending.step:
                _finish_step(cfg, learner, metrics, summary, pending, progress)
            log.warning("interrupted: saving a checkpoint at step %d", progress.step)
            if progress.step > 0:
                checkpoint()
        summary.last_step = progress.step
        summary.final_adapter = str(run_dir / "adapters" / f"step-{progress.step:06d}") if progress.step else None
        return summary
    finally:
        # Every way out frees this run's slot on every replica (a failed run too: two leaked
        # slots fill a default --max-loras 2 and stall every later trainer); `--resume` reloads it.
        release_adapter_slots(cfg, _stale_prefix(cfg))
        stop.__exit__(None, None, None)
        if metrics is not None:
            metrics.close()
        if learner is not None:
            learner.shutdown()  # a group's workers and placement group go, so a next run can place its own
        if started_ray:
            ray.shutdown()


@dataclass
class Progress:
    step: int = 0  # last completed step
    position: int = 0  # prompts consumed (the data position)
    adapter: str | None = None  # adapter name policy_gen generates with (None = base model)


@dataclass
class Pending:
    step: int
    ref: object  # learner.train_step_async's handle (a GroupCall)
    batch: RolloutBatch
    items: list[PromptItem]
    deadline: StepDeadline  # the adapter sync after the update draws on it too


def _finish_step(cfg, learner, metrics: MetricsLogger, summary: RunSummary, pending: Pending, progress: Progress) -> None:
    """Wait for the update, publish the adapter, log; then (and only then) advance `progress`."""
    k, batch, items = pending.step, pending.batch, pending.items
    with pending.deadline.paused():  # the deadline bounds the step's waits on services, not the learner's update
        stats = learner.train_step_result(pending.ref)
    t0 = time.perf_counter()
    path = learner.save_adapter(str(cfg.run_dir / "adapters" / f"step-{k:06d}"))
    try:  # into every policy_gen replica; one that fails is out of rotation until a later sync
        sync = sync_adapter(cfg, path, adapter_name(cfg.run_dir, k), progress.adapter, step=k,
                            stale_prefix=_stale_prefix(cfg), deadline=pending.deadline)
    except NoReplicaHoldsAdapter as e:
        raise StepFailed(f"step {k}: {e}") from e
    t_sync = time.perf_counter() - t0
    _prune_adapters(cfg, k)
    stats.update({
        "time/generate": batch.time_generate, "time/score": batch.time_score, "time/rollout": batch.time_total,
        "time/sync": t_sync, "data/position": progress.position + len(items),
        **{f"retries/{name}": v for name, v in batch.retries.items()},
        **sync.metrics(), "rollouts/stale_dropped": batch.stale_dropped,
    })
    s = batch.samples
    rollouts = {
        "positions": [it.index for it in items],
        "r_pref": [x.r_pref for x in s], "r_abs": [x.r_abs for x in s],
        "response_length": [len(x.response_ids) for x in s], "example": s[0].response_text[:200],
    }
    summary.metrics.append(metrics.log(k, stats, rollouts))
    progress.step, progress.position, progress.adapter = k, progress.position + len(items), adapter_name(cfg.run_dir, k)
    summary.last_step = k


def _prune_adapters(cfg: PPOConfig, step: int) -> list[Path]:
    """Delete adapters/step-* folders beyond the newest `run.keep_adapters`, except checkpoints'.

    Kept: the newest N (the one policy_gen serves, `step`, is always the newest) and every step
    that has a checkpoint (the policy you would evaluate or resume from). Returns the deleted.
    """
    keep = cfg.run.keep_adapters
    if keep is None:
        return []
    adapters = sorted((cfg.run_dir / "adapters").glob("step-*"))
    checkpointed = {p.name for p in (cfg.run_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file()}
    protected = {p.name for p in adapters[-keep:]} | checkpointed | {f"step-{step:06d}"}
    deleted = [p for p in adapters if p.name not in protected]
    for old in deleted:
        shutil.rmtree(old, ignore_errors=True)
    return deleted
