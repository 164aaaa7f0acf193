"""Ray set-up and the rollout actors (thin Ray actors around `RolloutWorker`, which tests use without Ray).

Rollout actors reserve no CPU: they wait on HTTP, and on a 2-core machine reserving cores
for waiting would starve the services. The learner is `trainer.ppo.learner_group.LearnerGroup`
(one handle for any number of learner workers).
"""

from __future__ import annotations

import logging
import os

import ray

from trainer.ppo.config import PPOConfig, RaySection

log = logging.getLogger("crs_rlhf.ppo")


def init_ray(rc: RaySection) -> bool:
    """Join `rc.address` (or `$RAY_ADDRESS`, as Ray itself does) or start a quiet local cluster.
    Returns True if we connected (and must disconnect, which stops a cluster we started)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False, "ignore_reinit_error": True}
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster: its size is its own, so no num_cpus / object store here
        if rc.num_cpus is not None:
            log.warning("ray.num_cpus %s is ignored: joining the Ray cluster at %s", rc.num_cpus, address)
        ray.init(address=address, **kwargs)
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

    def probe(self, targets: list, wait_s: float) -> dict:
        """This actor's node, and which of `targets` (trainer.clients.wait.Target) are not ready from
        it within `wait_s`: the driver's own check says nothing about what other nodes reach."""
        from trainer.clients.wait import ServicesNotReady, wait_ready

        try:
            wait_ready(targets, wait_s, log_every_s=wait_s + 1)
            problem = None
        except ServicesNotReady as e:
            problem = str(e)
        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "not_ready": problem}

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
    """`ray.num_rollout_workers` actors, round robin over the cluster's alive nodes: each holds its
    own HTTP connections and event loop, so spreading them spreads the client-side work
    (tokenizing, JSON, scoring requests) instead of piling it onto the driver's node.

    Each is pinned to its node softly: Ray's SPREAD strategy is best effort, and was seen putting
    both of two workers on the head while a second node had been up for 90 s. A soft pin still
    lets a worker whose node is lost restart on a node that is alive."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = spread_over_nodes(cfg.ray.num_rollout_workers, ray.nodes(), ray.get_runtime_context().get_node_id())
    return [
        RolloutActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(cfg, i)
        for i, node in enumerate(nodes)
    ]


def spread_over_nodes(count: int, nodes: list[dict], here: str) -> list[str]:
    """Node ids for `count` workers, round robin over the alive `nodes` (rows as `ray.nodes()`
    gives them: NodeID, NodeManagerAddress, Alive), starting on the driver's node `here`, then
    the others by address. Pure.

    >>> rows = [{"NodeID": "b", "NodeManagerAddress": "10.0.0.2", "Alive": True},
    ...         {"NodeID": "x", "NodeManagerAddress": "10.0.0.1", "Alive": False},
    ...         {"NodeID": "a", "NodeManagerAddress": "10.0.0.1", "Alive": True}]
    >>> spread_over_nodes(3, rows, here="b")
    ['b', 'a', 'b']
    """
    alive = sorted((n for n in nodes if n["Alive"]), key=lambda n: (n["NodeID"] != here, n["NodeManagerAddress"], n["NodeID"]))
    if not alive:
        raise RuntimeError("Ray reports no alive node to place the rollout workers on")
    return [alive[i % len(alive)]["NodeID"] for i in range(count)]


def check_rollout_nodes(workers: list, targets: list, wait_s: float = 30.0) -> list[dict]:
    """Ask every rollout worker whether the services answer /ready from its node; raise
    ServicesNotReady naming the worker and node if not. Returns each worker's probe (its node)."""
    from trainer.clients.wait import ServicesNotReady

    probes = ray.get([w.probe.remote(targets, wait_s) for w in workers])
    for i, p in enumerate(probes):
        if p["not_ready"]:
            raise ServicesNotReady(
                f"rollout worker {i} on node {p['ip']} cannot reach the services the driver reached: {p['not_ready']}. "
                "Every Ray node runs rollouts: give services.* URLs that every node reaches (a loopback address "
                "such as 127.0.0.1 names each node's own host)")
    log.info("rollout workers' nodes: %s", ", ".join(f"{i} on {p['ip']}" for i, p in enumerate(probes)))
    return probes


def warn_loopback_urls(urls: list[str]) -> list[str]:
    """Loopback service URLs on a cluster of several nodes: warn loudly (they reach only the local host)."""
    import ipaddress
    from urllib.parse import urlparse

    def loopback(url: str) -> bool:
        host = urlparse(url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    nodes = [n for n in ray.nodes() if n["Alive"]]
    found = [u for u in urls if loopback(u)]
    if len(nodes) > 1 and found:
        log.warning("services at loopback URLs %s on a Ray cluster of %d nodes: only workers on the same host as each "
                    "service reach it; give addresses every node reaches", found, len(nodes))
    return found if len(nodes) > 1 else []
