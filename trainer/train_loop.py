"""One small training loop for SFT and both reward models (plain torch, tqdm, resumable).

Why not `Trainer`: our losses need whole ranked sets per prompt and per-sample weights, and
the loop is 100 lines; a custom `compute_loss` plus collators would be longer. Resume is
exact: the data order of epoch e is a permutation seeded by (seed, e), so skipping the
micro-batches already done lands on the same batch a run without the interruption saw.

Data parallel (torchrun): every rank walks the same global micro-batches and takes its
contiguous share of each (whole ranked sets stay on one rank). A rank's loss is a mean over
its own terms (tokens, sets, pairs or rows: `units`), so it is scaled by world * its terms /
the batch's terms; the mean of the ranks' gradients is then exactly the one-device gradient.
Gradients are averaged once per optimizer step (flat all_reduce, before clipping), not by
DDP: a rank may hold no item of a short last micro-batch, which DDP's per-backward hooks
cannot express, and one reduction per step is the least communication there is.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from trainer.config_base import Section
from trainer.config_io import dump_config
from trainer.train_device import (
    DistInfo,
    Precision,
    TrainDevice,
    all_reduce_sum,
    average_gradients,
    broadcast_params,
    shard_slice,
    shard_weight,
)


class EmptyDataError(ValueError):
    """Nothing left to train on after filtering (the message says which filters removed what)."""


def write_outputs(out: Path, cfg, metrics: dict, card: str) -> None:
    """A trained model's folder gets its metrics.json, the config it was trained with, and a README card."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    dump_config(cfg, out / "config.yaml")
    (out / "README.md").write_text(card)


class TrainSection(Section):
    """Optimisation. Thesis values (RMs): Adam (0.9, 0.95), lr 5e-5 cosine, warmup 0.03,
    max grad norm 0.3, grad accumulation 16, one epoch; defaults here suit the tiny models."""

    lr: float = Field(1e-3, description="peak learning rate (cosine decay after warmup)")
    epochs: int = Field(1, ge=1, description="passes over the training data")
    max_steps: int | None = Field(None, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(8, ge=1, description="items per micro-batch (preference: ranked sets)")
    grad_accum: int = Field(1, ge=1, description="micro-batches whose gradients are averaged into one optimizer step")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="share of the optimizer steps spent warming the lr up linearly")
    max_grad_norm: float = Field(0.3, description="clip the gradient norm to this before each optimizer step")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    adam_eps: float = Field(1e-8, description="AdamW epsilon")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch, fp32 states: 8 bytes per trained weight) or adamw_8bit (bitsandbytes, "
        "CUDA only, 2 bytes per trained weight: what makes full fine-tuning of a 7B fit, docs/training.md)")
    seed: int = Field(0, description="data order and initialisation (the score head, LoRA A)")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    resume: bool = Field(True, description="continue from output_dir/checkpoint/ when it exists")
    cpu_threads: int = Field(
        1, ge=0, description="torch threads while training on CPU (0 = torch's default). 1 is fastest for small "
        "models on shared cores: measured 0.06 s vs 0.56 s per tiny-model step with 2 threads under load",
    )
    precision: Precision = Field(
        "auto", description="auto (bf16 on a CUDA GPU with bf16, else fp32), fp32, or bf16: frozen weights in bf16, "
        "trained weights in fp32, forward under bf16 autocast, losses in fp32")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (non-reentrant; works with LoRA): ~1/3 more compute "
        "for activation memory of one layer instead of all")
    dist_timeout_s: float = Field(1800, gt=0, description="torchrun runs: seconds a collective may wait for a peer")


def make_optimizer(params: list, cfg: TrainSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from `cfg.optimizer`; adamw_8bit needs bitsandbytes and the parameters on a CUDA device."""
    kw = {"lr": cfg.lr, "betas": cfg.adam_betas, "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    if device.type != "cuda":
        raise ValueError(f"train.optimizer: adamw_8bit runs on CUDA only (the model is on {device.type}); "
                         "use train.optimizer: adamw")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("train.optimizer: adamw_8bit needs bitsandbytes: pip install 'crs-rlhf[gpu]'") from None
    return bnb.optim.AdamW8bit(params, **kw)


@dataclass
class LoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    resumed_from: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def cpu_threads(n: int):
    """Temporarily set torch's intra-op threads (CPU only); restored afterwards."""
    before = torch.get_num_threads()
    if n and not torch.cuda.is_available():
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_loop(
    model: torch.nn.Module,
    items: Sequence[Any],
    loss_fn: Callable[[torch.nn.Module, list[Any]], torch.Tensor],
    cfg: TrainSection,
    ckpt_dir: Path,
    desc: str = "train",
    *,
    units: Callable[[list[Any]], float] | None = None,
    dev: TrainDevice | None = None,
) -> LoopResult:
    """Minimise `loss_fn(model, micro_batch_items)` (a scalar mean over `units(items)` terms) over `items`.

    With `dev.dist.world` > 1 each rank runs `loss_fn` on its shard of every micro-batch;
    `units` (terms the mean is over) weights the shards. Rank 0 alone writes checkpoints.
    """
    if not items:
        raise ValueError("no training items")
    info = dev.dist if dev is not None else DistInfo()
    rank, world = info.rank, info.world
    if world > 1 and units is None:
        raise ValueError("data-parallel training needs units(items) to weight each rank's shard")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, params[0].device if params else torch.device("cpu"))
    micro_per_epoch = math.ceil(len(items) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    from transformers import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    result, micro = LoopResult(0), 0  # micro: micro-batches consumed so far
    ckpt = ckpt_dir / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["params"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        result = LoopResult(state["step"], state["losses"], resumed_from=state["step"])
        micro = state["micro"]
    if world > 1:
        broadcast_params(params)

    def save() -> None:
        if not info.is_main:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"params": _trainable(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": result.steps, "micro": micro, "losses": result.losses}, ckpt)

    model.train()
    # None: off when not a TTY; other ranks never draw
    bar = tqdm(total=total, initial=result.steps, desc=desc, leave=False, disable=None if info.is_main else True)
    autocast = dev.autocast if dev is not None else nullcontext
    acc_loss, acc_n = 0.0, 0
    while result.steps < total:
        epoch, pos = divmod(micro, micro_per_epoch)
        order = _epoch_order(len(items), cfg.seed, epoch)
        batch = [items[i] for i in order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]]
        weight = 1.0
        if world > 1:  # this rank's share, scaled so the ranks' mean gradient is the batch's
            shard = batch[shard_slice(len(batch), rank, world)]
            weight = shard_weight(units(shard) if shard else 0.0, units(batch), world)
            batch = shard
        if weight > 0:
            with autocast():
                loss = loss_fn(model, batch)
            (loss * weight / cfg.grad_accum).backward()
            acc_loss += loss.item() * weight / world
        acc_n += 1
        micro += 1
        if acc_n == cfg.grad_accum or micro % micro_per_epoch == 0:
            if world > 1:
                average_gradients(params, world)
                acc_loss = all_reduce_sum(acc_loss, params[0].device)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            result.steps += 1
            result.losses.append(acc_loss / acc_n)
            bar.update(1)
            bar.set_postfix(loss=f"{acc_loss / acc_n:.4f}")
            acc_loss, acc_n = 0.0, 0
            if cfg.save_steps and result.steps % cfg.save_steps == 0:
                save()
    bar.close()
    save()
    model.eval()
    return result
