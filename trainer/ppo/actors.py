"""Thin Ray actors around the plain classes (which tests use without Ray).

Rollout actors reserve no CPU: they wait on HTTP, and on a 2-core machine reserving cores
for waiting would starve the services. The learner takes one CPU, and a GPU when the
cluster has one (`ray.learner_gpu: auto`); with `learner.num_workers` N > 1 each of the N
workers of a `LearnerGroup` does. `make_learner` hands the driver either behind one interface.
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


def learner_gpus(rc: RaySection, num_workers: int = 1) -> int:
    """GPUs per learner worker (0 or 1): `ray.learner_gpu` is the one switch for any number of workers."""
    if rc.learner_gpu == "never":
        return 0
    gpus = ray.cluster_resources().get("GPU", 0)
    if rc.learner_gpu == "always" and gpus < 1:
        raise RuntimeError("ray.learner_gpu is 'always' but the Ray cluster has no GPU")
    if gpus < 1:
        return 0
    if gpus < num_workers:  # auto/always with too few: half the workers on CPU would pace the whole group
        raise RuntimeError(f"learner.num_workers {num_workers} needs {num_workers} GPUs (one each) but the Ray cluster has "
                           f"{gpus:g}: lower learner.num_workers, add GPU nodes, or set ray.learner_gpu never (CPU workers)")
    return 1


@ray.remote(num_cpus=0)
class RolloutActor:
    def __init__(self, cfg: PPOConfig, worker_index: int):
        from trainer.ppo.rollout import RolloutWorker

        self.worker = RolloutWorker(cfg, worker_index)

    def rollout(self, prompts, adapter, step, overlap=None):
        try:
            return self.worker.rollout(prompts, adapter, step, overlap)
        except Exception as e:  # noqa: BLE001 - re-raised as text, whatever it was
            # Client exceptions (openai's, httpx's) need their response object to unpickle, so
            # Ray would hand the driver an UnserializableException instead: send plain text.
            raise RolloutError(f"{type(e).__name__}: {e}") from None


class RolloutError(RuntimeError):
    """A rollout worker's failure, as text that crosses process boundaries intact."""


class LearnerFailed(RuntimeError):
    """The learner (an actor, or a worker of the group) died or raised; the message names it and its node."""


@ray.remote(num_cpus=1)
class LearnerActor:
    def __init__(self, cfg: PPOConfig):
        from trainer.ppo.learner import Learner

        self.learner = Learner(cfg)

    def node(self) -> dict:
        import os
        import socket

        return {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid()}

    def train_step(self, samples):
        return self.learner.train_step(samples)

    def save_adapter(self, path):
        return self.learner.save_adapter(path)

    def save_checkpoint(self, path, trainer_state):
        return self.learner.save_checkpoint(path, trainer_state)

    def load_checkpoint(self, path):
        return self.learner.load_checkpoint(path)

    def device_name(self):
        return self.learner.device_name()


class SingleLearner:
    """Driver-side handle of the one `LearnerActor` (learner.num_workers 1), with the methods of
    `LearnerGroup`: the driver holds one interface for any N. Blocking, except `train_step_async`,
    which returns the step's ObjectRef so that Ctrl-C can still finish an update in flight."""

    num_workers = 1

    def __init__(self, cfg: PPOConfig, gpus: int):
        self.actor = LearnerActor.options(num_gpus=gpus).remote(cfg)
        self._node = self.actor.node.remote()  # resolved once the model is loaded; read when reporting a failure

    def _get(self, ref, method: str):
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            try:
                n = ray.get(self._node, timeout=5)
                where = f" (node {n['ip']} / {n['host']}, pid {n['pid']})"
            except Exception:  # noqa: BLE001 - died before it reported its node
                where = ""
            what = "died" if isinstance(e, ray.exceptions.RayActorError) else "failed"
            raise LearnerFailed(f"the learner actor{where} {what} during {method}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300].rstrip('.')}. Resume the run from its last checkpoint (--resume)") from None

    def train_step_async(self, samples):
        return self.actor.train_step.remote(samples)

    def train_step_result(self, ref) -> dict:
        return self._get(ref, "train_step")

    def save_adapter(self, path: str) -> str:
        return self._get(self.actor.save_adapter.remote(str(path)), "save_adapter")

    def save_checkpoint(self, path: str, trainer_state: dict) -> str:
        return self._get(self.actor.save_checkpoint.remote(str(path), trainer_state), "save_checkpoint")

    def load_checkpoint(self, path: str) -> dict:
        return self._get(self.actor.load_checkpoint.remote(str(path)), "load_checkpoint")

    def device_name(self) -> str:
        return self._get(self.actor.device_name.remote(), "device_name")

    def shutdown(self) -> None:
        ray.kill(self.actor)


def make_learner(cfg: PPOConfig, name: str | None = None):
    """The run's learner handle: `SingleLearner` for learner.num_workers 1, else a `LearnerGroup`
    (workers' actor names prefixed by `name`). Both: train_step_async / train_step_result,
    save_adapter, save_checkpoint, load_checkpoint, device_name, shutdown."""
    n = cfg.learner.num_workers
    gpus = learner_gpus(cfg.ray, n)
    if n == 1:
        return SingleLearner(cfg, gpus)
    from trainer.ppo.learner_group import LearnerGroup

    return LearnerGroup(cfg, n, gpus=gpus > 0, collective_timeout_s=cfg.learner.collective_timeout_s, name=name)


def make_rollout_workers(cfg: PPOConfig) -> list:
    """`ray.num_rollout_workers` actors, SPREAD over the cluster's nodes: each holds its own HTTP
    connections and event loop, so spreading them spreads the client-side work (tokenizing,
    JSON, scoring requests) instead of piling it onto the driver's node."""
    return [RolloutActor.options(scheduling_strategy="SPREAD").remote(cfg, i) for i in range(cfg.ray.num_rollout_workers)]
