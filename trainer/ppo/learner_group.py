"""A data-parallel learner group: N Ray actors in one torch.distributed process group.

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

Experience (policy/reference logprobs and values, computed without gradients) is built by
every rank on the whole batch: GAE and advantage whitening need the whole batch, and these
no-grad forwards are about a seventh of a step's compute (2 forwards against ppo_epochs ×
forward+backward). Collectives run with a timeout, so a dead peer fails the step instead of
hanging it; the driver then names the dead worker's node.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time

import ray
import torch
import torch.distributed as dist

from trainer.ppo import core
from trainer.ppo.config import PPOConfig
from trainer.ppo.experience import Experience
from trainer.ppo.learner import Learner

log = logging.getLogger("crs_rlhf.ppo.learner_group")


class LearnerGroupError(RuntimeError):
    """A learner worker died or a collective failed; the message names the worker and its node."""


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Contiguous near-equal row slice of rank `rank` among `world` ranks (n=5, world=2: 0:3, 3:5)."""
    k, r = divmod(n, world)
    start = rank * k + min(rank, r)
    return slice(start, start + k + (1 if rank < r else 0))


def shard_weight(rank_tokens: float, total_tokens: float, world: int) -> float:
    """Loss scale of one rank: world · its tokens / all tokens (mean over ranks of the scaled
    shard means = the global token mean; e.g. shards of 3 and 1 tokens: 2·3/4 and 2·1/4)."""
    return world * rank_tokens / max(total_tokens, 1.0)


class ShardedLearner(Learner):
    """The plain `Learner`, one rank of a group: shards each minibatch, averages gradients.

    Needs an initialised default process group (`init_group`); with world size 1 it is the
    plain learner. Tests use it directly inside Ray actors (`LearnerWorker`).
    """

    def __init__(self, cfg: PPOConfig, device: str | None = None):
        super().__init__(cfg, device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.trainable = [q for g in self.optimizer.param_groups for q in g["params"]]
        with torch.no_grad():  # one starting point for every rank, whatever their seeds did
            for q in self.trainable:
                dist.broadcast(q.data, src=0)

    def average_gradients(self) -> None:
        """Mean of every rank's gradients, in place, as one flat all_reduce."""
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (total trainable numel,)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for q, g in zip(self.trainable, grads):
            q.grad = flat[offset : offset + g.numel()].view_as(q).clone()
            offset += g.numel()

    def update(self, exp: Experience) -> dict:
        """`Learner.update`'s schedule (TRL's), with each minibatch's rows split across ranks."""
        p, o = self.cfg.ppo, self.cfg.optim
        self.model.train()
        mb_size, accum = self.cfg.mini_batch_size, p.grad_accum
        acc: dict[str, float] = {}
        n_mb, steps = 0, 0
        for _ in range(p.ppo_epochs):
            # The same generator state on every rank: all ranks walk the same minibatches.
            perm = torch.randperm(exp.size, generator=self.generator).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            for i, idx in enumerate(perm.split(mb_size)):
                total = exp.response_mask[idx].sum().item()
                idx = idx[shard_rows(len(idx), self.rank, self.world)]  # this rank's rows of the minibatch
                mask = exp.response_mask[idx]
                weight = shard_weight(mask.sum().item(), total, self.world)
                fwd = self.forward(exp.sequences[idx], exp.attention_mask[idx], exp.prompt_len)
                logprobs = core.logprobs_from_logits(fwd.logits, exp.response_ids[idx])  # (b, A)
                pg = core.policy_loss(logprobs, exp.logprobs[idx], exp.advantages[idx], mask, p.clip_range)
                vf = core.value_loss(fwd.values, exp.values[idx], exp.returns[idx], mask, p.clip_range_value)
                entropy = core.masked_mean(core.entropy_from_logits(fwd.logits), mask)
                loss = pg.loss + p.vf_coef * vf.loss - p.entropy_coef * entropy
                (loss * weight / accum).backward()
                if (i + 1) % accum == 0:
                    self.average_gradients()  # before clipping: clip the global gradient
                    if o.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self.trainable, o.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    steps += 1
                n_mb += 1
                for k, v in (("loss/policy", pg.loss), ("loss/value", vf.loss), ("policy/clipfrac", pg.clipfrac),
                             ("policy/approx_kl", pg.approx_kl), ("policy/entropy", entropy), ("value/clipfrac", vf.clipfrac)):
                    acc[k] = acc.get(k, 0.0) + float(v.detach()) * weight / self.world
        # Token-weighted shard stats summed over ranks = each minibatch's global stat.
        keys = sorted(acc)
        totals = torch.tensor([acc[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(totals)
        stats = {k: float(v) / n_mb for k, v in zip(keys, totals)}
        stats["value/explained_variance"] = core.explained_variance(exp.values, exp.returns, exp.response_mask).item()
        stats["ppo/optimizer_steps"] = steps
        stats["learner/num_workers"] = self.world
        return stats


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
    """One rank: a thin Ray actor around `ShardedLearner` (rank 0 alone writes files)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.learner: ShardedLearner | None = None

    def node(self) -> dict:
        return {"rank": self.rank, "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def master_port(self) -> int:
        return _free_port()

    def setup(self, cfg: PPOConfig, master_addr: str, master_port: int, timeout_s: float) -> str:
        backend = init_group(self.rank, self.world, master_addr, master_port, timeout_s)
        self.learner = ShardedLearner(cfg)
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


class LearnerGroup:
    """Driver-side handle of N `LearnerWorker`s; the same methods as the single learner actor.

    Placement: one bundle per worker ({"CPU": 1, "GPU": 1} when `gpus`), PACK strategy, so the
    group fills GPU nodes before spreading (NCCL within a node is the fast path). The rendezvous
    address is rank 0's node IP and a port rank 0 found free there.
    """

    def __init__(self, cfg: PPOConfig, num_workers: int, *, gpus: bool = False, collective_timeout_s: float = 600.0):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if cfg.mini_batch_size % num_workers:
            raise ValueError(f"learner.num_workers {num_workers} must divide the minibatch size {cfg.mini_batch_size} "
                             "(ppo.mini_batch_size, or batch_size / num_minibatches): each worker takes a share of every minibatch")
        self.num_workers = num_workers
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
        if not self.pg.wait(timeout_seconds=300):
            raise LearnerGroupError(f"could not place {num_workers} learner workers ({bundle} each) in 300 s: the Ray cluster "
                                    f"has {ray.cluster_resources()}; lower learner.num_workers or add nodes")
        self.workers = [
            LearnerWorker.options(
                num_gpus=1 if gpus else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, num_workers)
            for r in range(num_workers)
        ]
        self.nodes = ray.get([w.node.remote() for w in self.workers])
        addr, port = self.nodes[0]["ip"], ray.get(self.workers[0].master_port.remote())
        self.backends = self._all("setup", cfg, addr, port, collective_timeout_s)
        log.info("learner group: %d workers (%s) on %s, rendezvous %s:%d", num_workers, self.backends[0],
                 ", ".join(sorted({n["ip"] for n in self.nodes})), addr, port)

    def _describe(self, rank: int) -> str:
        n = self.nodes[rank]
        return f"learner worker rank {rank} (node {n['ip']} / {n['host']}, pid {n['pid']})"

    def _all(self, method: str, *args) -> list:
        """Call `method` on every rank and wait; the first failure raises naming its rank and node."""
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending, results = list(refs), {}
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
                raise LearnerGroupError(f"{self._describe(rank)} {what} during {method}: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:300]}. Resume the run from its last checkpoint "
                                        "(--resume)") from None
        return [results[r] for r in refs]

    @staticmethod
    def _alive(worker) -> bool:
        try:
            ray.get(worker.node.remote(), timeout=10)
            return True
        except Exception:  # noqa: BLE001 - dead, unreachable or hung: not alive for our purpose
            return False

    def train_step(self, samples) -> dict:
        ref = ray.put(samples)  # one copy in the object store, read by every rank
        t0 = time.perf_counter()
        stats = self._all("train_step", ref)[0]
        stats["time/learn_group"] = time.perf_counter() - t0
        return stats

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
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            with contextlib.suppress(Exception):  # a dead worker has nothing left to tear down
                ray.get(w.shutdown.remote(), timeout=30)
            ray.kill(w)
        remove_placement_group(self.pg)
