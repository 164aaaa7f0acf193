"""Packed scoring: many items per row, each isolated by a block-diagonal mask.

`PackedScorer.score_ids(rows)` takes token-id rows (as `RewardEngine.score_ids` does) and
returns one raw logit per row, equal to the item scored alone. Three things make a packed
row equal to its items scored one by one:

* Positions restart at 0 for every item. Position ids alone do not isolate items: with an
  explicit mask transformers skips its own packed-sequence detection, so the mask must.
* A block-diagonal mask: a token sees only its own item (causal inside it for decoders,
  bidirectional for BERT-shaped encoders). FlexAttention gets a `BlockMask` (fully masked
  blocks are skipped, so cost grows with the items' own lengths, not the row's); SDPA and
  eager get a dense 4-D mask (B, 1, L, L), which works everywhere, CPU included.
* Pooling at each item's own token (last for decoders, first/[CLS] for BERT) and the
  score head in fp32, as the padded engine does.

Rows come padded to a few bucket lengths (packing.py), so `torch.compile(dynamic=False)`
compiles once per bucket at warm-up and never again under load.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from services.reward.packing import (
    PackedRow,
    PackingOptions,
    PackPlan,
    Slot,
    bucket_for,
    default_buckets,
    plan_packed_rows,
)

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "flex", "sdpa", "eager")
_HF_ATTN = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}
# Model types whose encoder takes position ids from 0 and pools [CLS] via pooler + classifier.
# RoBERTa-style models count positions from padding_idx + 1, so they are refused, not guessed.
_BERT_TYPES = {"bert"}


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(requested: str, device: torch.device) -> str:
    """auto = flex on CUDA (BlockMask skips masked blocks), sdpa elsewhere (no compile needed)."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {requested!r}")
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    if requested == "flex" and not flex_available():
        raise ValueError("attention 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5); use 'sdpa'")
    return requested


def default_row_tokens(attention: str, device: torch.device, max_tokens: int) -> int:
    """Row budget: 32k for flex on CUDA (as measured on an H200); 8k for a dense mask on CUDA
    (its (L, L) mask costs L^2 bytes); 2048 on CPU. Never below the longest item."""
    if device.type == "cuda":
        base = 32768 if attention == "flex" else 8192
    else:
        base = 2048
    return max(base, max_tokens)


@dataclass(frozen=True)
class RowTensors:
    """One packed row on the device, ready for the backbone."""

    input_ids: torch.Tensor  # (1, L) item tokens end to end, then pad_id
    position_ids: torch.Tensor  # (1, L) 0..n-1 inside every item; 0 on padding
    seq_ids: torch.Tensor  # (1, L) item number in the row; each pad token its own negative id
    pool_at: torch.Tensor  # (n,) offset of the token each item is pooled at
    indices: tuple[int, ...]  # caller's item index for each pooled token


def row_tensors(row: PackedRow, rows: Sequence[Sequence[int]], pad_id: int, pool: str, device) -> RowTensors:
    """Lay row.items out as tensors. pool: 'last' (decoders) or 'first' (BERT's [CLS])."""
    L = row.length
    ids = torch.full((1, L), pad_id, dtype=torch.long)  # (1, L)
    pos = torch.zeros((1, L), dtype=torch.long)  # (1, L)
    # Pads get distinct negative ids so each attends only to itself: no all-masked softmax row.
    seq = -1 - torch.arange(L, dtype=torch.long)[None]  # (1, L)
    pool_at = []
    for k, s in enumerate(row.items):
        ids[0, s.start : s.start + s.length] = torch.as_tensor(rows[s.index], dtype=torch.long)
        pos[0, s.start : s.start + s.length] = torch.arange(s.length)
        seq[0, s.start : s.start + s.length] = k
        pool_at.append(s.last if pool == "last" else s.start)
    return RowTensors(ids.to(device), pos.to(device), seq.to(device),
                      torch.tensor(pool_at, dtype=torch.long, device=device), tuple(s.index for s in row.items))


def dense_block_mask(seq_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: same item (and key <= query when causal)."""
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, L, L)
    if causal:
        L = seq_ids.shape[1]
        q = torch.arange(L, device=seq_ids.device)
        same = same & (q[:, None] >= q[None, :])  # (B, L, L)
    return same[:, None]  # (B, 1, L, L)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> 0 / dtype-min, the form eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def flex_block_mask(seq_ids: torch.Tensor, causal: bool, mask_mod: Callable | None = None):
    """A FlexAttention BlockMask for the same rule as dense_block_mask; no (L, L) tensor on CUDA.
    mask_mod, when given, must compute that rule for these seq_ids (PackedScorer's cached one)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = seq_ids.shape

    def document(b, h, q, kv):
        same = seq_ids[b, q] == seq_ids[b, kv]
        return same & (q >= kv) if causal else same

    document = mask_mod or document

    # _compile builds the block table without materialising L x L on CUDA (32k^2 = 1 GiB).
    return create_block_mask(document, B, None, L, L, device=seq_ids.device, _compile=seq_ids.device.type == "cuda")


class _Head(nn.Module):
    """The model's own score head, copied in fp32, applied to pooled hidden states (N, H)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "decoder":
            self.score = copy.deepcopy(model.score).float()
        else:  # bert: pooler (dense + tanh on [CLS]) then the classifier
            self.pooler = copy.deepcopy(model.base_model.pooler).float()
            self.classifier = copy.deepcopy(model.classifier).float()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N,)
        pooled = pooled.float()
        if self.kind == "decoder":
            return self.score(pooled)[:, 0]
        return self.classifier(self.pooler(pooled[:, None, :]))[:, 0]  # pooler reads [:, 0]


def model_kind(model: nn.Module) -> str:
    """'decoder' (a linear `score` head on a causal backbone) or 'bert'; else a clear error."""
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear) and model.base_model is not model:
        return "decoder"
    mtype = getattr(model.config, "model_type", "")
    if mtype in _BERT_TYPES and getattr(model.base_model, "pooler", None) is not None and hasattr(model, "classifier"):
        return "bert"
    raise ValueError(f"packing supports decoder reward models with a linear `score` head and BERT encoders; "
                     f"{type(model).__name__} (model_type {mtype!r}) is neither: serve it with --packing off")


@dataclass(frozen=True)
class PackedScores:
    scores: list[float]  # raw logit per input row, in input order
    plan: PackPlan
    seconds: float


class PackedScorer:
    """Scores token-id rows in packed rows. Sets the model's attention implementation to
    match its mask, so give it the model it should own (the engine's, when wired in)."""

    def __init__(self, model: nn.Module, *, pad_id: int, max_tokens: int, options: PackingOptions | None = None):
        options = options or PackingOptions()
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = int(pad_id)
        self.kind = model_kind(model)
        self.attention = resolve_attention(options.attention, self.device)
        self.row_tokens = options.row_tokens or default_row_tokens(self.attention, self.device, max_tokens)
        if self.row_tokens < max_tokens:
            raise ValueError(f"row_tokens {self.row_tokens} < max_tokens {max_tokens}: the longest item would "
                             "not fit a row; raise the row budget (--row-tokens) or lower --max-tokens")
        self.buckets = options.buckets or default_buckets(self.row_tokens, count=options.bucket_count)
        self.options = options
        # Remembered so a caller that falls back to padded batches can hand the model back as it was.
        self._original_attention = getattr(model.config, "_attn_implementation", None)
        model.set_attn_implementation(_HF_ATTN[self.attention])
        self.head = _Head(model, self.kind).to(self.device)
        self._flex_mods: dict[int, tuple[torch.Tensor, Callable]] = {}  # bucket length -> (buffer, mask_mod)
        self._backbone: Callable = model.base_model
        if options.compile:
            # One static shape per bucket: dynamic=False, and enough cache entries for all.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(self.buckets))
            self._backbone = torch.compile(model.base_model, dynamic=False, mode=options.compile_mode,
                                           backend=options.compile_backend)

    def plan(self, lengths: Sequence[int]) -> PackPlan:
        return plan_packed_rows(lengths, self.row_tokens, self.buckets)

    def _mask(self, seq_ids: torch.Tensor):
        causal = self.kind == "decoder"
        if self.attention == "flex":
            return self._flex_mask(seq_ids, causal)
        mask = dense_block_mask(seq_ids, causal)
        return mask if self.attention == "sdpa" else additive_mask(mask, self.dtype)

    def _flex_mask(self, seq_ids: torch.Tensor, causal: bool):
        """As flex_block_mask, but one mask function per bucket reading a persistent buffer:
        a compiled backbone guards on the BlockMask's mask_mod, and a fresh closure per row
        would recompile it for every row."""
        L = seq_ids.shape[1]
        if L not in self._flex_mods:
            buf = seq_ids.clone()

            def document(b, h, q, kv):
                same = buf[b, q] == buf[b, kv]
                return same & (q >= kv) if causal else same

            self._flex_mods[L] = (buf, document)
        buf, document = self._flex_mods[L]
        buf.copy_(seq_ids)
        return flex_block_mask(seq_ids, causal, mask_mod=document)

    @torch.inference_mode()
    def pooled(self, t: RowTensors) -> torch.Tensor:
        """One row through the backbone: (n, H) hidden state at each item's pooling token."""
        kwargs = {"use_cache": False} if self.kind == "decoder" else {}
        out = self._backbone(input_ids=t.input_ids, position_ids=t.position_ids,
                             attention_mask=self._mask(t.seq_ids), **kwargs)
        hidden = out.last_hidden_state[0]  # (L, H)
        return hidden[t.pool_at]  # (n, H)

    @torch.inference_mode()
    def run_row(self, t: RowTensors) -> torch.Tensor:
        """One row through backbone + fp32 head: (n,) scores for the row's items."""
        return self.head(self.pooled(t))  # (n,)

    def score_row(self, rows: Sequence[Sequence[int]], row: PackedRow) -> list[float]:
        """Scores of one planned row's items, in `row.items` order (the batcher's unit of work)."""
        pool = "last" if self.kind == "decoder" else "first"
        return self.run_row(row_tensors(row, rows, self.pad_id, pool, self.device)).tolist()

    def score_plan(self, rows: Sequence[Sequence[int]], plan: PackPlan) -> list[float]:
        scores: list[float | None] = [None] * len(rows)
        pool = "last" if self.kind == "decoder" else "first"
        for row in plan.rows:
            t = row_tensors(row, rows, self.pad_id, pool, self.device)
            for i, s in zip(t.indices, self.run_row(t).tolist()):
                scores[i] = s
        return scores  # type: ignore[return-value]

    def score(self, rows: Sequence[Sequence[int]]) -> PackedScores:
        start = time.perf_counter()
        plan = self.plan([len(r) for r in rows])
        scores = self.score_plan(rows, plan)
        return PackedScores(scores, plan, time.perf_counter() - start)

    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Drop-in for RewardEngine.score_ids (the batcher's ScoreFn)."""
        return self.score(rows).scores if rows else []

    def warmup(self) -> float:
        """Run one row of every bucket (compiling each shape once); returns seconds spent."""
        start = time.perf_counter()
        for b in self.buckets:
            # Two items per row, so the warm-up mask has the block structure seen under load.
            halves = [b - b // 2, b // 2] if b > 1 else [1]
            rows = [[self.pad_id] * n for n in halves]  # content is irrelevant, shapes are not
            self.score_plan(rows, PackPlan((_one_row(halves, b),), self.row_tokens, self.buckets))
        seconds = time.perf_counter() - start
        log.info("packed scorer warm-up: %d bucket(s) %s, attention=%s, compile=%s, %.1f s",
                 len(self.buckets), self.buckets, self.attention, self.options.compile, seconds)
        return seconds


    def self_check(self, item: Sequence[int], neighbour: Sequence[int]) -> float:
        """Relative change of `item`'s pooled hidden state when `neighbour` precedes it in
        its row, vs `item` first in a row of its own: ~0 when the model honours our position
        ids and block mask, large when its attention ignores them (it then sees the neighbour
        or counts positions across the row). Runs at a bucket shape, so a compiled backbone
        does not recompile. Returns |h_packed - h_alone| / |h_alone| (max over H is not used:
        one norm is steadier in bf16)."""
        rows = [list(neighbour), list(item)]
        together = (len(neighbour), len(item))
        pool = "last" if self.kind == "decoder" else "first"
        packed_row = _one_row(list(together), bucket_for(sum(together), self.buckets))
        alone_row = PackedRow((Slot(1, 0, len(item)),), bucket_for(len(item), self.buckets))
        h_packed = self.pooled(row_tensors(packed_row, rows, self.pad_id, pool, self.device))[1].float()  # (H,)
        h_alone = self.pooled(row_tensors(alone_row, rows, self.pad_id, pool, self.device))[0].float()  # (H,)
        return float((h_packed - h_alone).norm() / h_alone.norm().clamp_min(1e-12))

    def release(self) -> None:
        """Give the model back with its original attention implementation (padded fallback)."""
        if self._original_attention is not None:
            self.model.set_attn_implementation(self._original_attention)


def _one_row(lengths: list[int], length: int) -> PackedRow:
    slots, start = [], 0
    for i, n in enumerate(lengths):
        slots.append(Slot(i, start, n))
        start += n
    return PackedRow(tuple(slots), length)
