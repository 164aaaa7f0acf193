"""What a second node changes, in small pieces: paths pinned before workers see the config,
the full-adapter-table failure classified, gloo bound to the node's interface, errors read
without terminal colours, a collective's error told from a rank's own, loopback URLs noticed,
the cluster's nodes described (each lost address once), and the services checked from each rollout worker's node (real local Ray). The two-node runs: tests/test_multinode.py."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray is imported (see test_learner_group.py)

import socket

import psutil
import pytest

from trainer.ppo.config import PPOConfig, pin_paths


def test_pin_paths_makes_every_worker_path_absolute(tmp_path, monkeypatch):
    (tmp_path / "models" / "sft").mkdir(parents=True)
    (tmp_path / "prompts.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = PPOConfig.model_validate({"model": {"policy_path": "models/sft"},
                                    "run": {"output_dir": "runs/a", "data_source": "prompts.jsonl"}})
    pinned = pin_paths(cfg)
    assert pinned.model.policy_path == str(tmp_path / "models" / "sft")
    assert pinned.run.output_dir == str(tmp_path / "runs" / "a")  # need not exist yet
    assert pinned.run.data_source == str(tmp_path / "prompts.jsonl")
    assert cfg.model.policy_path == "models/sft"  # a copy: the caller's config is unchanged
    # What does not exist here is left alone: a hub id, or the shipped fixture.
    hub = pin_paths(PPOConfig.model_validate({"model": {"policy_path": "org/some-model"}}))
    assert hub.model.policy_path == "org/some-model" and hub.run.data_source == "fixture"


def test_full_adapter_table_is_a_refused_request_with_its_hint():
    from trainer.clients.policy import AdapterTableFull
    from trainer.ppo.cli import EXIT_CONFIG, classify_failure

    code, message = classify_failure(AdapterTableFull(
        "max_loras=1 reached; waited 5s (run.adapter_slot_wait_s) for a free slot. Each trainer sharing this policy_gen "
        "holds one adapter: start it with --max-loras >= the number of trainers"))
    assert code == EXIT_CONFIG == 2
    assert message.startswith("policy_gen refused the adapter: ") and "--max-loras" in message


def test_interface_for_an_ip():
    from trainer.ppo.learner_group import interface_for

    lo = [n for n, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs)]
    assert interface_for("127.0.0.1") == lo[0]
    assert interface_for("127.0.0.2") == lo[0]  # not listed on lo, but inside its 127.0.0.0/8
    assert interface_for("203.0.113.7") is None  # TEST-NET-3: on no interface here
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                assert interface_for(a.address) == name


def test_bind_collectives_keeps_what_the_user_set(monkeypatch):
    from trainer.ppo.learner_group import bind_collectives_to, interface_for

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert bind_collectives_to("127.0.0.1") == interface_for("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == interface_for("127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    assert bind_collectives_to("127.0.0.1") == "ib0"


def test_errors_lose_their_colours_and_collective_errors_are_told_apart():
    import torch.distributed as dist

    from trainer.ppo.driver import _clean_error
    from trainer.ppo.learner_group import _clean, _collective_error

    ray_text = "\x1b[36mray::LearnerWorker.train_step()\x1b[39m (pid=1, ip=127.0.0.2)\n  File x\nRuntimeError: boom"
    assert _clean(ray_text) == "ray::LearnerWorker.train_step() (pid=1, ip=127.0.0.2)"
    assert "\x1b" not in _clean_error(ray_text) and _clean_error(ray_text).endswith("RuntimeError: boom")
    assert _collective_error(dist.DistBackendError("x"))
    assert _collective_error(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.2]:4"))
    assert not _collective_error(ValueError("shapes (2, 3) and (4,) differ"))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from trainer.ppo.actors import init_ray
    from trainer.ppo.config import RaySection

    started = init_ray(RaySection(num_cpus=1))
    yield
    if started:
        ray.shutdown()


def test_loopback_urls_are_noticed_only_on_several_nodes(local_ray):
    from trainer.ppo.actors import warn_loopback_urls

    # One node here: loopback URLs are fine, and nothing is reported.
    assert warn_loopback_urls(["http://127.0.0.1:8000", "http://localhost:8001", "http://rm:8002"]) == []


def test_rollout_workers_check_the_services_from_their_node(local_ray, tmp_path):
    from services.common.process import free_port
    from trainer.clients.wait import ServicesNotReady, Target
    from trainer.ppo.actors import check_rollout_nodes, make_rollout_workers

    cfg = PPOConfig.model_validate({"ray": {"num_rollout_workers": 2}, "run": {"output_dir": str(tmp_path)}})
    workers = make_rollout_workers(cfg)
    assert len(check_rollout_nodes(workers, [])) == 2
    nobody = Target("reward_pref", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ServicesNotReady, match=r"rollout worker 0 on node [0-9.]+ cannot reach .*reward_pref at "):
        check_rollout_nodes(workers, [nobody], wait_s=1.0)


def test_rollout_workers_go_round_robin_over_the_alive_nodes_from_the_drivers_own():
    from trainer.ppo.actors import spread_over_nodes

    node = lambda nid, ip, alive=True: {"NodeID": nid, "NodeManagerAddress": ip, "Alive": alive}  # ray.nodes() rows
    nodes = [node("c", "10.0.0.3"), node("dead", "10.0.0.2", alive=False), node("b", "10.0.0.2"), node("h", "10.0.0.1")]
    assert spread_over_nodes(2, nodes, here="h") == ["h", "b"]  # never two on one node while another is idle
    assert spread_over_nodes(5, nodes, here="c") == ["c", "h", "b", "c", "h"]  # then by address
    assert spread_over_nodes(1, nodes[:1], here="elsewhere") == ["c"]  # a driver outside the cluster
    with pytest.raises(RuntimeError, match="no alive node"):
        spread_over_nodes(1, [node("dead", "10.0.0.2", alive=False)], here="h")


def test_cluster_described_with_each_lost_address_once_and_a_rejoined_one_alive():
    from trainer.ppo.learner_group import describe_nodes

    node = lambda ip, alive: {"NodeManagerAddress": ip, "Alive": alive}  # ray.nodes() rows
    # 10.0.0.2 died twice (two dead entries); 10.0.0.3 died and rejoined at the same address.
    nodes = [node("10.0.0.1", True), node("10.0.0.2", False), node("10.0.0.2", False), node("10.0.0.3", False),
             node("10.0.0.3", True)]
    assert describe_nodes(nodes, {"CPU": 1.0}, {"CPU": 2.0}) == (
        "2 alive node(s) (10.0.0.1, 10.0.0.3), lost: 10.0.0.2; free {'CPU': 1.0} of {'CPU': 2.0}")
    assert describe_nodes(nodes[:1], {}, {}) == "1 alive node(s) (10.0.0.1); free {} of {}"


def test_placement_wait_logs_once_per_period_to_its_deadline(local_ray, caplog):
    """Ray's placement wait counts whole seconds (a fraction is 0: it returns at once), so the
    last part of the wait must not become a busy loop logging "0 s left" hundreds of times."""
    import re
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from trainer.ppo.learner_group import wait_placed

    pg = placement_group([{"CPU": 64}])  # more than the local cluster has: never placed
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="crs_rlhf.ppo.learner_group"):
        placed = wait_placed(pg, "2 learner workers", wait_s=1.5, first_log_s=1.0, log_every_s=15.0)
    remove_placement_group(pg)
    assert not placed and 1.5 <= time.monotonic() - t0 < 4
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting to place 2 learner workers")]
    assert len(waits) == 1 and re.search(r"; [01] s left \(ray\.placement_wait_s\)$", waits[0]), waits
