"""One deadline per PPO step (`run.step_timeout_s`): the clock itself, the old budgets refused
by name, and a wait that draws on it giving up in time with a message naming the key."""

from __future__ import annotations

import time

import pytest

from trainer.ppo.deadline import StepDeadline


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadline_counts_down_and_pauses():
    clock = FakeClock()
    d = StepDeadline(10, clock=clock)
    assert d.left() == 10 and not d.spent
    clock.now += 4
    assert d.left() == 6
    with d.paused():  # the learner's update: does not count
        clock.now += 100
    assert d.left() == 6
    clock.now += 7
    assert d.left() == 0 and d.spent  # never negative
    assert str(d) == "run.step_timeout_s = 10 s"


@pytest.mark.parametrize("old", [{"services": {"wait_ready_s": 5}}, {"services": {"retry_max_s": 5}},
                                 {"run": {"step_retries": 1}}, {"run": {"adapter_slot_wait_s": 0}}])
def test_the_replaced_budgets_are_refused_by_name(old):
    from trainer.config_io import ConfigError, load_config
    from trainer.ppo.config import PPOConfig

    section, values = next(iter(old.items()))
    key = next(iter(values))
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: replaced by run.step_timeout_s"):
        load_config(PPOConfig, None, [f"{section}.{key}={values[key]}"])
    assert PPOConfig().run.step_timeout_s == 900


def test_a_wait_gives_up_when_the_step_deadline_is_spent():
    from services.common.process import free_port
    from trainer.clients.wait import ServicesNotReady
    from trainer.ppo.config import PPOConfig
    from trainer.ppo.policy_sync import wait_for_a_replica

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: never ready
    cfg = PPOConfig.model_validate({"services": {"policy_url": url, "reward_abs_urls": [url]}, "crs": {"weight": 0.0}})
    t0 = time.monotonic()
    with pytest.raises(ServicesNotReady, match=r"step's deadline \(run.step_timeout_s = 1 s\).*run.step_timeout_s"):
        wait_for_a_replica(cfg, StepDeadline(1.0), poll_s=0.2)
    assert time.monotonic() - t0 < 10  # bounded by the deadline, not by a budget of its own (was 900 s)
