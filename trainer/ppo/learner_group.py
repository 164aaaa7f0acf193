"""The learner handle: `LearnerGroup`, N Ray actors (`LearnerWorker`), for every N.

N = 1 is the plain `Learner` in one actor, with no process group. N > 1 is data parallel, the
N actors in one torch.distributed process group.

Two rules carry correctness (N workers give the weights one worker gives, within fp32 noise):

1. Every PPO minibatch is split across the ranks by rows, and each rank's loss is scaled by
   N · (its response tokens / the minibatch's tokens). The losses are token-level masked means,
   so after averaging the gradients over ranks the sum is exactly the gradient of the
   minibatch's own masked mean; plain row-count splitting would be biased whenever the shards
   hold different numbers of tokens.
2. Gradients are averaged ONCE per optimizer step, on one flat buffer of the trainable
   parameters (LoRA + value head), and clipping runs after the average, on the global
   gradient. All ranks start from rank 0's weights (broadcast) and shuffle with the same
   seeded generator, so their Adam states stay identical and rank 0's checkpoint is everyone's.

Why a plain `all_reduce` and not DDP: the trainable set is a few MB of LoRA weights, so DDP's
main gift (overlapping bucketed communication with backward) buys little, while its costs are
real here: the policy forward also runs with the adapter disabled (the reference) and a separate
value head, gradient accumulation would need `no_sync`, and DDP's hooks fire per backward.
One flat all_reduce per optimizer step is the least communication possible and reads plainly.
FSDP (a base too big for one GPU) is not supported: see docs/scaling.md.

Experience (policy/reference logprobs and values, computed without gradients) is split the
same way: each rank runs the forwards on its rows of the batch and an all_gather hands every
rank the whole (B, A) tensors, because GAE and advantage whitening need the whole batch (the
gathered tensors are identical on every rank, so the ranks stay in lockstep). Collectives run
with a timeout, so a dead peer fails the step instead of hanging it; the driver then names the
dead worker's rank and node. The update itself (sharding, micro-batches, token weights) is
`Learner.update` with the data-parallel helpers of `trainer.train_device`: this module adds
only the process group, the actors and the driver's handle.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from trainer.ppo.config import PPOConfig, RaySection
from trainer.ppo.learner import Learner

log = logging.getLogger("crs_rlhf.ppo.learner_group")


class LearnerFailed(RuntimeError):
    """A learner worker died, raised, or a collective failed; the message names the worker's rank and node."""


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


def start_learner(cfg: PPOConfig, name: str | None = None) -> LearnerGroup:
    """The run's learner: `learner.num_workers` workers (1 = the plain learner), a GPU each when
    `ray.learner_gpu` gives one; `name` prefixes the workers' Ray actor names."""
    n = cfg.learner.num_workers
    return LearnerGroup(cfg, n, gpus=learner_gpus(cfg.ray, n) > 0, collective_timeout_s=cfg.learner.collective_timeout_s,
                        name=name)


def interface_for(ip: str) -> str | None:
    """The network interface that holds `ip` (exactly, else within its subnet: 127.0.0.2 is on
    `lo`, which lists 127.0.0.1/8); None when no interface does."""
    import psutil

    addr, within = ipaddress.ip_address(ip), None
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.netmask:
                continue
            try:
                net = ipaddress.ip_network(f"{a.address.split('%')[0]}/{a.netmask}", strict=False)
            except ValueError:
                continue
            if a.address.split("%")[0] == ip:
                return name
            if within is None and addr in net:
                within = name
    return within


def bind_collectives_to(ip: str) -> str | None:
    """Make gloo (and NCCL's bootstrap) use the interface holding this node's Ray IP.

    Left alone, gloo binds to whatever the hostname resolves to; on hosts that map their name
    to a loopback address (Debian's 127.0.1.1) a peer on another node is then told to connect
    to its own loopback. A variable the user already set wins. Returns the interface used.
    """
    name = interface_for(ip)
    if name is None:
        log.warning("no network interface holds this node's Ray IP %s: gloo/NCCL pick their own", ip)
        return os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
    return os.environ["GLOO_SOCKET_IFNAME"]


def init_group(rank: int, world: int, master_addr: str, master_port: int, timeout_s: float, backend: str | None = None) -> str:
    """Join the default process group (NCCL when this process sees a GPU, else gloo)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(
        backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_view() -> str:
    """What Ray has now, in words: alive nodes, lost ones, free and total resources."""
    keep = ("CPU", "GPU")
    free = {k: v for k, v in ray.available_resources().items() if k in keep}
    total = {k: v for k, v in ray.cluster_resources().items() if k in keep}
    return describe_nodes(ray.nodes(), free, total)


def describe_nodes(nodes: list[dict], free: dict, total: dict) -> str:
    """`nodes` as `ray.nodes()` gives them (NodeManagerAddress, Alive) in words. Ray keeps a dead
    node's entry after a node rejoins at the same address: only addresses with no alive node
    are lost, each named once."""
    alive = sorted({n["NodeManagerAddress"] for n in nodes if n["Alive"]})
    lost = sorted({n["NodeManagerAddress"] for n in nodes if not n["Alive"]} - set(alive))
    return (f"{len(alive)} alive node(s) ({', '.join(alive)})" + (f", lost: {', '.join(lost)}" if lost else "")
            + f"; free {free} of {total}")


def wait_placed(pg, what: str, wait_s: float, first_log_s: float = 2.0, log_every_s: float = 15.0) -> bool:
    """Wait up to `wait_s` for placement group `pg`; after `first_log_s`, and every `log_every_s`
    from then on, log what the cluster has and the time left."""
    deadline, chunk = time.monotonic() + wait_s, first_log_s
    while True:
        left = deadline - time.monotonic()
        # Ray waits whole seconds (a fraction is 0, an instant return): round up, or the end
        # of the wait would spin, logging on every turn. The deadline may pass by < 1 s.
        if pg.wait(timeout_seconds=max(1, math.ceil(min(chunk, left)))):
            return True
        left, chunk = deadline - time.monotonic(), log_every_s
        if left <= 0:
            return False
        log.warning("waiting to place %s: the cluster has %s; %.0f s left (ray.placement_wait_s)", what, cluster_view(), left)


def _clean(text: str) -> str:
    """First line of an error, without the terminal colours Ray puts in worker tracebacks."""
    line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).strip().splitlines()
    return (line[0] if line else "")[:300].rstrip(".")


def _collective_error(e: BaseException) -> bool:
    """A rank's error that says a peer went away (gloo / NCCL / the rendezvous store), not its own fault."""
    if isinstance(e, dist.DistError):  # Ray re-raises a task's error as an instance of its cause too
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                   "Timed out waiting", "DistBackendError", "DistNetworkError"))


@ray.remote(num_cpus=1)
class LearnerWorker:
    """One rank: a thin Ray actor around the plain `Learner` (rank 0 alone writes files). A group
    of one has no process group; in a larger one the learner finds its rank in the group it joined."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.learner: Learner | None = None

    def node(self) -> dict:
        return {"rank": self.rank, "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def master_port(self) -> int:
        return _free_port()

    def setup(self, cfg: PPOConfig, master_addr: str, master_port: int, timeout_s: float, device: str | None = None) -> str:
        # device None: this worker's GPU when Ray gave it one (NCCL), else the CPU (gloo).
        backend = "single"  # a group of one has nothing to talk to: no process group
        if self.world > 1:
            backend = None if device is None else ("nccl" if device.startswith("cuda") else "gloo")
            self.interface = bind_collectives_to(ray.util.get_node_ip_address())
            backend = init_group(self.rank, self.world, master_addr, master_port, timeout_s, backend)
        self.learner = Learner(cfg, device)
        return f"{backend}:{self.learner.device}"

    def train_step(self, samples):
        return self.learner.train_step(samples)

    def save_adapter(self, path):
        return self.learner.save_adapter(path) if self.rank == 0 else None

    def save_checkpoint(self, path, trainer_state):
        return self.learner.save_checkpoint(path, trainer_state) if self.rank == 0 else None

    def load_checkpoint(self, path):
        return self.learner.load_checkpoint(path)

    def trainable_state(self) -> dict:
        """Trainable tensors by name, on CPU (tests compare ranks with each other and with N = 1)."""
        names = {id(q): n for n, q in self.learner.model.named_parameters()}
        out = {names[id(q)]: q.detach().cpu().clone() for q in self.learner.trainable if id(q) in names}
        out.update({f"value_head.{k}": v.detach().cpu().clone() for k, v in self.learner.value_head.state_dict().items()})
        return out

    def device_name(self):
        return str(self.learner.device)

    def interface_name(self) -> str | None:
        """The interface gloo/NCCL were bound to (`bind_collectives_to`)."""
        return getattr(self, "interface", None)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class GroupCall:
    """A method running on every rank (`LearnerGroup.train_step_async`); `train_step_result` collects it."""

    method: str
    refs: list  # one ObjectRef per rank, in rank order
    started: float  # perf_counter at submission


_group_ids = itertools.count()


class LearnerGroup:
    """Driver-side handle of N `LearnerWorker`s, the driver's one learner handle for any N
    (train_step_async / train_step_result, save_adapter, save_checkpoint, load_checkpoint,
    device_name, shutdown). Blocking, except `train_step_async`, which returns at once so that
    Ctrl-C can still finish an update in flight.

    Placement: one bundle per worker ({"CPU": 1, "GPU": 1} when `gpus`), PACK strategy, so the
    group fills GPU nodes before spreading (NCCL within a node is the fast path). The rendezvous
    address is rank 0's node IP and a port rank 0 found free there. `name` prefixes the workers'
    Ray actor names (`{name}-{k}-rank-{r}`), so `ray list actors` shows whose workers they are.
    """

    poll_s = 1.0  # how often a wait looks at Ray's node table
    grace_s = 5.0  # after a rank's collective failed, how long the others have to answer or be reported dead

    def __init__(self, cfg: PPOConfig, num_workers: int, *, gpus: bool = False, collective_timeout_s: float = 600.0,
                 name: str | None = None):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if cfg.mini_batch_size % num_workers:
            raise ValueError(f"learner.num_workers {num_workers} must divide the minibatch size {cfg.mini_batch_size} "
                             "(ppo.mini_batch_size, or batch_size / num_minibatches): each worker takes a share of every minibatch")
        self.num_workers = num_workers
        self.workers, self.nodes = [], []
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
        wait_s = cfg.ray.placement_wait_s
        if not wait_placed(self.pg, f"{num_workers} learner workers ({bundle} each)", wait_s):
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            raise LearnerFailed(f"could not place {num_workers} learner workers ({bundle} each) in {wait_s:.0f} s "
                                    f"(ray.placement_wait_s): {cluster_view()}; lower learner.num_workers, add nodes or "
                                    "wait for a lost node to rejoin")
        prefix = f"{name}-{next(_group_ids)}" if name else None
        self.workers = [
            LearnerWorker.options(
                num_gpus=1 if gpus else 0, name=f"{prefix}-rank-{r}" if prefix else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, num_workers)
            for r in range(num_workers)
        ]
        try:
            self.nodes = ray.get([w.node.remote() for w in self.workers])
            addr, port = self.nodes[0]["ip"], ray.get(self.workers[0].master_port.remote())
            self.backends = self._all("setup", cfg, addr, port, collective_timeout_s, None if gpus else "cpu")
            self.interfaces = self._all("interface_name")
        except BaseException:
            self.shutdown()
            raise
        log.info("learner group: %d workers (%s), rendezvous %s:%d; %s", num_workers, self.backends[0], addr, port,
                 ", ".join(f"rank {r} on {n['ip']} (pid {n['pid']}, interface {i})"
                           for r, (n, i) in enumerate(zip(self.nodes, self.interfaces))))

    def _describe(self, rank: int) -> str:
        if rank >= len(self.nodes):  # failed before it reported its node
            return f"learner worker rank {rank}"
        n = self.nodes[rank]
        return f"learner worker rank {rank} (node {n['ip']} / {n['host']}, pid {n['pid']})"

    def _call(self, method: str, *args) -> GroupCall:
        return GroupCall(method, [getattr(w, method).remote(*args) for w in self.workers], time.perf_counter())

    def _wait(self, call: GroupCall) -> list:
        """Every rank's result; a failure raises naming the rank to blame, from Ray's own view.

        Liveness is never asked of a worker (a healthy rank blocked in a collective with a lost
        peer cannot answer): a rank is dead when Ray fails its call with RayActorError, or
        reports its node dead (`ray.nodes()`, polled while waiting, so a lost node fails the
        step within Ray's node-failure detection, not at the collective timeout). A rank whose
        collective failed only reports a peer's loss: the blame goes to a dead rank, then to one
        that still has not answered `grace_s` later; a rank's own error (not a collective's)
        blames that rank.
        """
        rank_of = {ref: r for r, ref in enumerate(call.refs)}
        pending, results, errors = list(call.refs), {}, {}
        first_error_at = None
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            for ref in done:
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    errors[rank_of[ref]] = e
            waiting = [rank_of[ref] for ref in pending]
            lost = self._lost_ranks(waiting)
            died = [r for r, e in sorted(errors.items()) if isinstance(e, ray.exceptions.RayActorError)]
            if died or lost:
                rank = (died or sorted(lost))[0]
                why = lost.get(rank) or self._death(errors[rank])
                raise self._failure(rank, f"died during {call.method}: {why}")
            if not errors:
                continue
            first_error_at = first_error_at or time.monotonic()
            own = [r for r, e in sorted(errors.items()) if not _collective_error(e)]
            if own:
                e = errors[own[0]]
                raise self._failure(own[0], f"failed during {call.method}: {type(e).__name__}: {_clean(str(e))}")
            if not pending or time.monotonic() - first_error_at >= self.grace_s:
                r0 = min(errors)
                seen = f"rank {r0} saw: {_clean(str(errors[r0]))}"
                if waiting:  # alive per Ray, yet silent while its peers' collective failed: hung or cut off
                    raise self._failure(waiting[0], f"stopped responding during {call.method} ({seen})")
                raise self._failure(r0, f"failed during {call.method}: {type(errors[r0]).__name__}: {_clean(str(errors[r0]))}")
        return [results[r] for r in call.refs]

    def _failure(self, rank: int, what: str) -> LearnerFailed:
        return LearnerFailed(f"{self._describe(rank)} {what}. Resume the run from its last checkpoint (--resume)")

    @staticmethod
    def _death(e: BaseException) -> str:
        return f"{type(e).__name__}: {_clean(str(e))}"

    def _lost_ranks(self, ranks: list[int]) -> dict[int, str]:
        """Ranks among `ranks` whose node Ray reports dead: {rank: why}."""
        if not ranks or not self.nodes:
            return {}
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        return {r: f"Ray reports its node {self.nodes[r]['ip']} dead" for r in ranks
                if r < len(self.nodes) and not alive.get(self.nodes[r]["node_id"], False)}

    def _all(self, method: str, *args) -> list:
        return self._wait(self._call(method, *args))

    def train_step_async(self, samples) -> GroupCall:
        """Start the step on every rank and return at once (the driver finishes it on Ctrl-C too)."""
        return self._call("train_step", ray.put(samples))  # one copy in the object store, read by every rank

    def train_step_result(self, call: GroupCall) -> dict:
        stats = self._wait(call)[0]
        stats["time/learn_group"] = time.perf_counter() - call.started
        return stats

    def train_step(self, samples) -> dict:
        return self.train_step_result(self.train_step_async(samples))

    def save_adapter(self, path: str) -> str:
        return self._all("save_adapter", str(path))[0]

    def save_checkpoint(self, path: str, trainer_state: dict) -> str:
        return self._all("save_checkpoint", str(path), trainer_state)[0]

    def load_checkpoint(self, path: str) -> dict:
        return self._all("load_checkpoint", str(path))[0]  # every rank restores the same state

    def trainable_states(self) -> list[dict]:
        return self._all("trainable_state")

    def device_name(self) -> str:
        return ",".join(self._all("device_name"))

    def shutdown(self) -> None:
        """Tear the process group down, kill the workers, free the placement group (idempotent)."""
        from ray.util.placement_group import remove_placement_group

        if not self.workers:
            return
        # A worker stuck in a collective with a dead peer would not answer: don't wait long.
        with contextlib.suppress(Exception):
            ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        for w in self.workers:
            with contextlib.suppress(Exception):  # a dead worker has nothing left to tear down
                ray.kill(w)
        self.workers = []
        remove_placement_group(self.pg)
