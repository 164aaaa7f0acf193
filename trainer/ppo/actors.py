"""Ray set-up and the rollout actors (thin Ray actors around `RolloutWorker`, which tests use without Ray).

Rollout actors reserve no CPU: they wait on HTTP, and on a 2-core machine reserving cores
for waiting would starve the services. The learner is `trainer.ppo.learner_group.LearnerGroup`
(one handle for any number of learner workers).
"""

from __future__ import annotations

import logging

import ray

from trainer.ppo.config import PPOConfig, RaySection


def init_ray(rc: RaySection) -> bool:
    """Join `rc.address` or start a quiet local cluster. Returns True if we started it (and must stop it)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False, "ignore_reinit_error": True}
    if rc.address:
        ray.init(address=rc.address, **kwargs)
    else:
        # Ray turns token auth on for a new local cluster and logs a banner saying so on every
        # start. Keep the auth, drop the banner. (Setting RAY_AUTH_MODE here would be too late:
        # Ray reads it into its config at import time, and a mismatch breaks ray.init.)
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_drop_auth_banner)
        # A small object store: rollouts are kilobytes, and a huge /dev/shm reservation slows start-up.
        ray.init(num_cpus=rc.num_cpus, object_store_memory=256 * 1024 * 1024, **kwargs)
    return True


def _drop_auth_banner(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


# Restartable: a rollout worker holds no state a redo needs (its clients are per rollout), so a
# worker lost mid-step (a killed process, the node's OOM killer) comes back for the step's redo
# instead of failing every redo until the step's deadline.
@ray.remote(num_cpus=0, max_restarts=-1)
class RolloutActor:
    def __init__(self, cfg: PPOConfig, worker_index: int):
        from trainer.ppo.rollout import RolloutWorker

        self.worker = RolloutWorker(cfg, worker_index)

    def rollout(self, prompts, adapter, step, overlap=None, retry_s=None):
        try:
            return self.worker.rollout(prompts, adapter, step, overlap, retry_s)
        except Exception as e:  # noqa: BLE001 - re-raised as text, whatever it was
            # Client exceptions (openai's, httpx's) need their response object to unpickle, so
            # Ray would hand the driver an UnserializableException instead: send plain text.
            kind = RolloutRefused if is_refusal(e) else RolloutError
            raise kind(f"{type(e).__name__}: {e}") from None


class RolloutError(RuntimeError):
    """A rollout worker's failure, as text that crosses process boundaries intact."""


class RolloutRefused(RolloutError):
    """A service refused a rollout request (HTTP 4xx): redoing the step would be refused alike."""


def is_refusal(e: BaseException) -> bool:
    """A 4xx that no retry can fix (not 404: a replica that lost the adapter; not 408/409/429: busy or racing)."""
    import openai

    from trainer.clients.reward import RewardRequestRefused

    if isinstance(e, RewardRequestRefused):
        return True
    return isinstance(e, openai.APIStatusError) and 400 <= e.status_code < 500 and e.status_code not in (404, 408, 409, 429)


def make_rollout_workers(cfg: PPOConfig) -> list:
    """`ray.num_rollout_workers` actors, SPREAD over the cluster's nodes: each holds its own HTTP
    connections and event loop, so spreading them spreads the client-side work (tokenizing,
    JSON, scoring requests) instead of piling it onto the driver's node."""
    return [RolloutActor.options(scheduling_strategy="SPREAD").remote(cfg, i) for i in range(cfg.ray.num_rollout_workers)]
