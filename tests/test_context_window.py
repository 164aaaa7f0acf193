"""A run whose prompt + completion budget does not fit policy_gen's context fails before step 1.

generation.max_prompt_tokens + generation.max_new_tokens above a replica's max_model_len makes
that replica refuse (400) the first step that draws a long prompt, which may be hours in. The
trainer reads each replica's max_model_len from /v1/models (policy_gen and vLLM both list it)
and refuses the config up front, naming the numbers and the replica, as verl does for its
rollout engine. Real HTTP: an in-process policy_gen (hf) and the session's reward_pref service.
"""

from __future__ import annotations

import asyncio

import pytest
from _serving_support import ThreadServer

from trainer.clients.policy import PolicyClient

CONTEXT = 192


@pytest.fixture(scope="module")
def policy_gen(tiny_models):
    from services.policy_gen.app import create_app
    from services.policy_gen.hf_backend import HFBackend
    from services.policy_gen.settings import PolicyGenSettings

    settings = PolicyGenSettings(model_path=str(tiny_models["policy"]), max_model_len=CONTEXT)
    with ThreadServer(create_app(settings, HFBackend(settings)), settings) as srv:
        yield srv.wait_ready()


def test_policy_client_reads_the_servers_context_length(policy_gen):
    async def read() -> int | None:
        async with PolicyClient(policy_gen.url, model="") as client:
            return await client.max_model_len()

    assert asyncio.run(read()) == CONTEXT


def _train(tiny_models, policy_gen, reward_pref_url, tmp_path, prompt_tokens: int, new_tokens: int, capsys):
    from trainer.ppo.cli import main

    code = main(["--config", "configs/tiny/ppo.yaml",
                 "--set", f"model.policy_path={tiny_models['policy']}",
                 "--set", f"services.policy_url={policy_gen.url}",
                 "--set", f"services.reward_pref_urls=[{reward_pref_url}]",
                 "--set", "crs.weight=1.0",
                 "--set", f"generation.max_prompt_tokens={prompt_tokens}",
                 "--set", f"generation.max_new_tokens={new_tokens}",
                 "--set", "run.steps=1",
                 "--output-dir", str(tmp_path / "run")])
    return code, capsys.readouterr().err


def test_train_refuses_a_budget_longer_than_the_policy_context(tiny_models, policy_gen, reward_pref_url, tmp_path, capsys):
    from trainer.ppo.cli import EXIT_CONFIG

    code, err = _train(tiny_models, policy_gen, reward_pref_url, tmp_path, 180, 16, capsys)
    assert code == EXIT_CONFIG, err
    assert "180" in err and "16" in err and str(CONTEXT) in err and policy_gen.url in err, err
    assert "max_model_len" in err and "generation.max_new_tokens" in err, err
    # Refused before Ray started or a learner loaded: no checkpoint, no metrics.
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_context_overflow_names_every_replica_that_is_short():
    from trainer.ppo.policy_sync import context_overflow

    assert context_overflow(176, 16, {"http://a": 192, "http://b": None}) is None  # exactly full fits
    why = context_overflow(1024, 512, {"http://a": 1536, "http://b": 1024, "http://c": None})
    assert why is not None and "http://b (max_model_len 1024)" in why and "http://a" not in why and "1536 tokens" in why
