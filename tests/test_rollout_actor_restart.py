"""A rollout worker lost mid-step comes back for the step's redo (the redo loop runs until the
step's deadline, so a worker that stayed dead would only burn it)."""

from __future__ import annotations

import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported (see test_learner_group.py)

import pytest

pytestmark = pytest.mark.slow


def test_a_killed_rollout_actor_restarts_and_answers_again():
    import ray

    from services.common.process import free_port
    from trainer.ppo.actors import RolloutError, init_ray, make_rollout_workers
    from trainer.ppo.config import PPOConfig, RaySection

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every rollout fails, as a RolloutError
    cfg = PPOConfig.model_validate({"services": {"policy_url": url, "reward_abs_urls": [url]}, "crs": {"weight": 0.0}})
    started = init_ray(RaySection(num_cpus=1))
    try:
        (worker,) = make_rollout_workers(cfg)
        with pytest.raises(RolloutError):  # alive: its own failure comes back as text
            ray.get(worker.rollout.remote([], None, 1, None, 0.1))
        ray.kill(worker, no_restart=False)  # as the OOM killer or a crash would
        deadline = time.monotonic() + 300  # the driver's redos, paused: calls meet the restart, never a dead actor
        while time.monotonic() < deadline:
            try:
                ray.get(worker.rollout.remote([], None, 1, None, 0.1), timeout=120)
            except ray.exceptions.ActorUnavailableError:  # restarting: the next redo goes through
                time.sleep(2)
                continue
            except RolloutError:  # restarted and answering (ActorDiedError would fail the test)
                break
        else:
            pytest.fail("the rollout actor never answered again after it was killed")
    finally:
        if started:
            ray.shutdown()
