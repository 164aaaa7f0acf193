"""Where and how SFT and reward-model training run: device, precision, k-bit base, data parallelism.

- **Precision** (`train.precision`): ``fp32``; ``bf16`` = frozen weights stored in bf16, every
  TRAINED tensor (LoRA, the score head, or all weights under full fine-tuning) kept in fp32 and
  the forward run under ``torch.autocast(bf16)``; losses are computed in fp32 (the SFT
  cross-entropy upcasts the logits, the reward head runs outside autocast). ``auto`` = bf16 on a
  CUDA GPU that supports it, else fp32. A bf16 Adam update of 5e-5 vanishes in bf16 weights,
  hence fp32 for what trains.
- **Quantization** (`model.quantization`: ``8bit`` / ``4bit`` NF4): the frozen base loaded through
  bitsandbytes under the LoRA adapter (QLoRA, as the thesis's runs). Needs CUDA and bitsandbytes.
- **Gradient checkpointing** (`train.gradient_checkpointing`): recompute activations in backward,
  non-reentrant (works with a frozen embedding under LoRA).
- **Data parallelism**: under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
  the process group is joined here: NCCL on CUDA, gloo on CPU. `trainer.train_loop.train_loop`
  shards every micro-batch by rank and averages gradients with `average_gradients`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from trainer.config_base import Quantization  # the literal lives with the config sections

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
GPU_INSTALL = "pip install 'crs-rlhf[gpu]' (or: pip install bitsandbytes)"


class DeviceSetupError(ValueError):
    """A setting this machine cannot honour; the message says what to change or install."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()  # one process, no group


@contextmanager
def distributed(timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    """Join the torch.distributed group that ``torchrun`` describes in the environment.

    No WORLD_SIZE (or 1): one process, nothing to join. A group someone else already
    initialised (a test harness, accelerate) is used as it is and left for its owner to close.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        yield DistInfo(dist.get_rank(), dist.get_world_size(), local)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield SINGLE
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local)
    log.info("rank %d of %d (%s, local rank %d)", info.rank, info.world, backend, local)
    try:
        yield info
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class TrainDevice:
    """Resolved once per run: where tensors live and in which dtypes."""

    device: torch.device
    storage_dtype: torch.dtype  # dtype frozen weights are loaded in
    compute_dtype: torch.dtype | None  # autocast dtype; None = plain fp32
    quantization: Quantization = "none"
    dist: DistInfo = SINGLE

    def autocast(self):
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def resolve_device(precision: Precision = "auto", quantization: Quantization = "none", *,
                   trains_base: bool = False, info: DistInfo = SINGLE) -> TrainDevice:
    """Device and dtypes for a run. trains_base: full fine-tuning (then every weight stays fp32)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise DeviceSetupError(f"train.precision: bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
                               "use train.precision: fp32 (or auto)")
    elif precision not in ("fp32", "bf16"):
        raise DeviceSetupError(f"unknown train.precision {precision!r}; use auto, fp32 or bf16")
    compute = torch.bfloat16 if precision == "bf16" else None
    if quantization != "none":
        require_bitsandbytes(quantization, device)
    storage = torch.bfloat16 if compute is not None and not trains_base else torch.float32
    return TrainDevice(device, storage, compute, quantization, info)


def require_bitsandbytes(quantization: str, device: torch.device) -> None:
    """bitsandbytes k-bit layers need CUDA and the package; say how to get either."""
    if device.type != "cuda":
        raise DeviceSetupError(f"model.quantization: {quantization} needs a CUDA GPU (bitsandbytes k-bit layers); "
                               "this machine has none: set model.quantization: none (LoRA on a bf16/fp32 base)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DeviceSetupError(f"model.quantization: {quantization} needs bitsandbytes, which is not installed: "
                               f"{GPU_INSTALL}; or set model.quantization: none") from None


def load_kwargs(td: TrainDevice) -> dict[str, Any]:
    """`from_pretrained` keyword arguments: dtype, and for a k-bit base its config and device map."""
    kwargs: dict[str, Any] = {"dtype": td.storage_dtype}
    if td.quantized:
        from transformers import BitsAndBytesConfig

        compute = td.compute_dtype or torch.float32
        skip = ["score", "lm_head"]  # heads stay in full precision (the score head is trained)
        if td.quantization == "4bit":
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
        else:
            q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        kwargs.update(quantization_config=q, device_map={"": td.device.index or 0})
    return kwargs


def prepare_base(model: nn.Module, td: TrainDevice, gradient_checkpointing: bool) -> nn.Module:
    """Before LoRA wrapping: k-bit preparation and/or non-reentrant gradient checkpointing."""
    ckpt_kwargs = {"use_reentrant": False}
    if td.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        # A frozen embedding under LoRA gives inputs without grad; harmless for full fine-tuning.
        model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    return model


def upcast_trainable(model: nn.Module) -> nn.Module:
    """Every trained tensor in fp32 (the master copy under bf16 autocast)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def place(model: nn.Module, td: TrainDevice) -> nn.Module:
    """Move to the device (a k-bit model was placed by its device map and cannot move)."""
    return model if td.quantized else model.to(td.device)


# ---- data parallelism ------------------------------------------------------------------

def shard_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous near-equal share of `n` items for `rank` (n=5, world=2: 0:3, 3:5; n=1: 0:1, 1:1)."""
    k, r = divmod(n, world)
    start = rank * k + min(rank, r)
    return slice(start, start + k + (1 if rank < r else 0))


def shard_weight(rank_units: float, total_units: float, world: int) -> float:
    """Loss scale of a rank whose loss is a mean over `rank_units` of the batch's `total_units`
    terms (tokens, sets, pairs, rows): averaging the scaled gradients over ranks gives the
    gradient of the whole batch's mean. 0 for a rank with nothing (or a batch of no terms)."""
    return world * rank_units / total_units if total_units > 0 else 0.0


def weighted_pieces(units: Sequence[float], rank: int, world: int, max_rows: int | None = None) -> list[tuple[slice, float]]:
    """This rank's pieces of a batch whose loss is a mean over units (tokens, pairs...; `units[i]`
    of row i): the rank's shard (`shard_slice`) cut into row slices of at most `max_rows`, each with
    its `shard_weight`. Backpropagating weight · (the piece's own mean loss) for every piece and
    averaging over ranks gives exactly the gradient of the whole batch's mean. Empty pieces are left out.

    units [1, 2, 3, 2], world 2, max_rows 1 -> rank 0: [(0:1, 2/8), (1:2, 4/8)]; rank 1: [(2:3, 6/8), (3:4, 4/8)].
    """
    total = float(sum(units))
    shard = shard_slice(len(units), rank, world)
    step = max_rows or max(shard.stop - shard.start, 1)
    pieces = []
    for start in range(shard.start, shard.stop, step):
        rows = slice(start, min(start + step, shard.stop))
        pieces.append((rows, shard_weight(float(sum(units[rows])), total, world)))
    return pieces


def all_gather_rows(mine: torch.Tensor, n_rows: int, world: int) -> torch.Tensor:
    """Every rank's `shard_slice` of `n_rows` rows, stacked back in rank order on every rank.

    mine: (K, b, ...) this rank's b rows of K stacked tensors -> (K, n_rows, ...). World 1: `mine`.
    """
    if world <= 1:
        return mine
    size = -(-n_rows // world)  # all_gather needs one shape: pad every shard to ceil(n / world) rows
    padded = mine.new_zeros((mine.shape[0], size, *mine.shape[2:]))
    padded[:, : mine.shape[1]] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    lengths = [len(range(n_rows)[shard_slice(n_rows, r, world)]) for r in range(world)]
    return torch.cat([p[:, :k] for p, k in zip(parts, lengths)], dim=1)


def sum_over_ranks(values: dict[str, float], device: torch.device, world: int) -> dict[str, float]:
    """Each value summed over the ranks (one all_reduce); world 1: the values themselves."""
    if world <= 1:
        return dict(values)
    keys = sorted(values)
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {k: float(v) for k, v in zip(keys, totals.tolist())}


def broadcast_params(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Every rank starts from rank `src`'s values, whatever its own seeds did."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def average_gradients(params: Sequence[torch.Tensor], world: int, bucket_numel: int = 1 << 25) -> None:
    """Mean of every rank's gradients, in place, as a few flat all_reduces of <= bucket_numel values.

    A parameter without a gradient (a rank whose shard was empty) takes part as zeros. Buckets
    bound the extra memory for full fine-tuning of a large model; LoRA fits one bucket. World 1:
    nothing to average.
    """
    if world <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in list(params) + [None]:
        if bucket and (p is None or size + p.numel() > bucket_numel or p.grad.dtype != bucket[0].grad.dtype):
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])  # (bucket numel,)
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            bucket, size = [], 0
        if p is not None:
            bucket.append(p)
            size += p.numel()


def all_reduce_sum(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. sampled paraphrases, which other ranks must not redraw)."""
    if info.world <= 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
