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
import itertools
import logging
import os
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

    def __init__(self, cfg: PPOConfig, num_workers: int, *, gpus: bool = False, collective_timeout_s: float = 600.0,
                 name: str | None = None):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if cfg.mini_batch_size % num_workers:
            raise ValueError(f"learner.num_workers {num_workers} must divide the minibatch size {cfg.mini_batch_size} "
                             "(ppo.mini_batch_size, or batch_size / num_minibatches): each worker takes a share of every minibatch")
        self.num_workers = num_workers
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
        if not self.pg.wait(timeout_seconds=300):
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            raise LearnerFailed(f"could not place {num_workers} learner workers ({bundle} each) in 300 s: the Ray cluster "
                                    f"has {ray.cluster_resources()}; lower learner.num_workers or add nodes")
        prefix = f"{name}-{next(_group_ids)}" if name else None
        self.workers = [
            LearnerWorker.options(
                num_gpus=1 if gpus else 0, name=f"{prefix}-rank-{r}" if prefix else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, num_workers)
            for r in range(num_workers)
        ]
        self.nodes: list[dict] = []
        try:
            self.nodes = ray.get([w.node.remote() for w in self.workers])
            addr, port = self.nodes[0]["ip"], ray.get(self.workers[0].master_port.remote())
            self.backends = self._all("setup", cfg, addr, port, collective_timeout_s, None if gpus else "cpu")
        except BaseException:
            self.shutdown()
            raise
        log.info("learner group: %d workers (%s) on %s, rendezvous %s:%d", num_workers, self.backends[0],
                 ", ".join(sorted({n["ip"] for n in self.nodes})), addr, port)

    def _describe(self, rank: int) -> str:
        if rank >= len(self.nodes):  # failed before it reported its node
            return f"learner worker rank {rank}"
        n = self.nodes[rank]
        return f"learner worker rank {rank} (node {n['ip']} / {n['host']}, pid {n['pid']})"

    def _call(self, method: str, *args) -> GroupCall:
        return GroupCall(method, [getattr(w, method).remote(*args) for w in self.workers], time.perf_counter())

    def _wait(self, call: GroupCall) -> list:
        """Every rank's result; the first failure raises naming its rank and node."""
        rank_of = {ref: r for r, ref in enumerate(call.refs)}
        pending, results = list(call.refs), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayError as e:
                rank = rank_of[ref]
                dead = isinstance(e, ray.exceptions.RayActorError)
                what = "died" if dead else "failed"
                # A dead worker leaves its peers waiting in a collective until the timeout; the first
                # error to arrive is the culprit or a peer that noticed it, so name every dead rank.
                for r, w in enumerate(self.workers):
                    if r != rank and not self._alive(w):
                        rank, what = r, "died"
                        break
                raise LearnerFailed(f"{self._describe(rank)} {what} during {call.method}: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:300].rstrip('.')}. Resume the run from its last checkpoint "
                                        "(--resume)") from None
        return [results[r] for r in call.refs]

    def _all(self, method: str, *args) -> list:
        return self._wait(self._call(method, *args))

    @staticmethod
    def _alive(worker) -> bool:
        try:
            ray.get(worker.node.remote(), timeout=10)
            return True
        except Exception:  # noqa: BLE001 - dead, unreachable or hung: not alive for our purpose
            return False

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
