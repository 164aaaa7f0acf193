"""The scoring engine: load a reward model, turn items into token ids, score padded batches.

No FastAPI here; the batcher calls `score_ids` from its one worker thread, the routes call
the `encode_*` methods. Two rules carry the correctness:

* An item's score must not depend on its batch (the thesis hit transformers issue 27502,
  where scores moved with the amount of padding). Rows are right-padded and each row is
  pooled at its LAST REAL TOKEN, found from the attention mask, never from a pad/EOS id.
* Packed rows (`--packing`, packed_forward.py) keep the first rule by construction: an item
  sees only itself (block-diagonal mask, positions from 0), so its score equals the padded
  path's. A model that cannot honour that mask is refused at start-up, never served wrong.
* The text is the training text: ChatML via services.common.chat, prompt and response
  tokenized separately so the prompt can be cut from its beginning (truncation.py). What a
  user or a policy wrote is text: its special-token strings stay text (tokenize.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.common.chat import CHATML, ChatFormat
from services.common.tokenize import Keep, Piece, ThreadTokenizer
from services.common.truncation import Truncated, special_affixes, truncate_left, truncate_pair
from services.reward.packed_forward import PackedScorer
from services.reward.packing import PackingOptions

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    """What `load_engine` needs; the services fill it from RewardServiceSettings."""

    model_path: str
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda when available
    max_tokens: int = 2048
    min_prompt_tokens: int = 256
    trust_remote_code: bool = False
    chat: ChatFormat = CHATML
    torch_threads: int | None = None  # intra-op threads; None = torch's default
    packing: str = "off"  # auto | on | off; the services pass --packing (default auto)
    packing_options: PackingOptions = field(default_factory=PackingOptions)


class PackingUnavailable(RuntimeError):
    """`--packing on` for a model or setup the packed path cannot serve: the service stops."""


# A packed item's pooled hidden state may move this much (relative) from the item alone, in
# its dtype: fp32 differs by ~1e-6; bf16 rounding over a deep model by ~1e-2 (not yet measured
# on a GPU, hence the margin); a model that ignores the block mask or our position ids, O(1).
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 1e-1}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def packing_wanted(packing: str, device: torch.device) -> bool:
    """auto = on for CUDA (padding waste dominates there), off on CPU (sorted padded batches
    were faster than a dense-masked packed row on the tiny models: docs/reward_gpu.md)."""
    if packing not in ("auto", "on", "off"):
        raise ValueError(f"packing must be auto, on or off, got {packing!r}")
    return packing == "on" or (packing == "auto" and device.type == "cuda")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _load_model_and_tokenizer(opts: EngineOptions, dtype: torch.dtype):
    """`from_pretrained` on a folder or hub id; a PEFT adapter folder is merged into its base."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(opts.model_path)
    adapter = path.is_dir() and (path / "adapter_config.json").exists()
    base_path = opts.model_path
    if adapter:
        from peft import PeftConfig

        if not (path / "adapter_model.safetensors").exists():
            raise ValueError(f"{path} has no adapter_model.safetensors: only safetensors weights are loaded")
        base_path = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=opts.trust_remote_code)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_classifier and config.num_labels != 1:
        raise ValueError(f"{base_path}: reward models require num_labels=1 (this one has {config.num_labels})")
    model = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=opts.trust_remote_code
    )
    if adapter:
        from peft import PeftModel

        # Merged for serving: one plain forward, no adapter indirection per layer.
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    tok_path = str(path) if adapter and (path / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=opts.trust_remote_code)
    return model, tokenizer


class RewardEngine:
    """A loaded reward model: `encode_*` makes token-id rows, `score_ids` returns raw logits."""

    def __init__(self, model: nn.Module, tokenizer, opts: EngineOptions, device: torch.device):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.opts = opts
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.prefix, self.suffix = special_affixes(tokenizer)

        limit = getattr(model.config, "max_position_embeddings", None) or opts.max_tokens
        self.max_tokens = min(opts.max_tokens, int(limit))
        if self.max_tokens < opts.max_tokens:
            log.info("max_tokens lowered from %d to the model's limit %d", opts.max_tokens, self.max_tokens)
        self.min_prompt_tokens = min(opts.min_prompt_tokens, self.max_tokens // 2)
        if self.min_prompt_tokens < opts.min_prompt_tokens:
            log.info("min_prompt_tokens lowered to %d (half of max_tokens)", self.min_prompt_tokens)
        # We truncate ourselves (truncation.py); silence the tokenizer's "sequence too long" warning.
        tokenizer.model_max_length = 1 << 60
        # Encoding runs in many request threads at once: each gets its own tokenizer copy.
        self.tok = ThreadTokenizer(tokenizer)

        pad = tokenizer.pad_token_id
        if pad is None or pad == tokenizer.eos_token_id:
            # Scores never read pad positions (mask + last-real-token pooling), so any id works;
            # say so rather than silently padding with EOS (the HF #27502 trap).
            log.warning("tokenizer has no pad token distinct from EOS; padding with id 0, pooled via the attention mask")
            pad = 0
        self.pad_id = int(pad)

        # Decoder RMs (Llama, Qwen, ...): a linear `score` head over the backbone. We pool
        # ourselves and run the head in fp32. Encoders (BERT, MiniLM) pool [CLS] with the mask.
        head = getattr(model, "score", None)
        self._head: nn.Linear | None = head if isinstance(head, nn.Linear) and model.base_model is not model else None
        # Set by `enable_packing` (load_engine does it): the batcher then plans packed rows.
        self.packed: PackedScorer | None = None

    # ------------------------------------------------------------------ packing

    def enable_packing(self) -> None:
        """Build the packed scorer if `opts.packing` asks for it; warm-up compiles and checks it.

        packing=on and it cannot be built: PackingUnavailable (the service refuses to start).
        packing=auto: one log line and the padded path."""
        wanted = packing_wanted(self.opts.packing, self.device)
        if not wanted:
            if self.opts.packing_options.compile:
                log.info("--compile ignored: packing is off on %s (auto); pass --packing on to compile packed rows",
                         self.device.type)
            return
        try:
            self.packed = PackedScorer(self.model, pad_id=self.pad_id, max_tokens=self.max_tokens,
                                       options=self.opts.packing_options)
        except Exception as exc:  # noqa: BLE001 -- auto falls back on any failure, on re-raises it
            self._packing_failed(exc)

    def _packing_failed(self, exc: Exception) -> None:
        if self.packed is not None:
            self.packed.release()
            self.packed = None
        if self.opts.packing == "on":
            raise PackingUnavailable(f"--packing on, but this model cannot be scored in packed rows: {exc} "
                                     "(start it with --packing off or auto)") from exc
        log.warning("packing unavailable, scoring padded length-sorted batches instead: %s", exc)

    def _check_packed(self) -> None:
        """Two probe items, one after the other in a row vs alone: a model whose attention
        ignores our 4-D/Block mask or position ids (some custom architectures) fails here
        instead of serving scores that depend on their neighbours."""
        probe = self._tokenize(["the packed self check looks at one item after another"])[0] or [self.pad_id]
        item = (self.prefix + probe + self.suffix)[: max(1, self.max_tokens // 2)]
        neighbour = (self.prefix + probe * 3 + self.suffix)[: max(1, self.max_tokens // 2)]
        drift = self.packed.self_check(item, neighbour)
        tol = SELF_CHECK_TOL.get(self.dtype, 1e-1)
        if not drift <= tol:  # also catches nan
            raise ValueError(f"packed self-check failed: an item's hidden state moved by {drift:.2e} (relative, "
                             f"> {tol:g}) when another item preceded it in the row, so this architecture's "
                             f"attention ignores the block mask or the position ids")

    # ------------------------------------------------------------------ encoding

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tok.ids(texts)

    def encode_pieces(self, pairs: Sequence[tuple[list[Piece], list[Piece]]]) -> list[Truncated]:
        """(prompt pieces, response pieces) -> truncated token-id rows.

        Only the prompt's last and the response's first `max_tokens` tokens can survive, so
        huge texts are cut before tokenizing (tokenize.py proves the ids unchanged)."""
        prompt_ids = self.tok.encode_kept([p for p, _ in pairs], "end", self.max_tokens)
        response_ids = self.tok.encode_kept([r for _, r in pairs], "start", self.max_tokens)
        return [
            truncate_pair(
                p, r, max_tokens=self.max_tokens, min_prompt_tokens=self.min_prompt_tokens,
                prefix=self.prefix, suffix=self.suffix,
            )
            for p, r in zip(prompt_ids, response_ids)
        ]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Truncated]:
        """(prompt part, response part) texts, already templated -> truncated token-id rows."""
        return self.encode_pieces([([(p, False)], [(r, False)]) for p, r in pairs])

    def encode_items(self, items: Sequence) -> list[Truncated]:
        """ScoreRequest items: {prompt, response} or {messages} (last one the assistant's).
        The texts of the items are content: special-token strings in them are plain text."""
        chat = self.opts.chat
        pairs = []
        for item in items:
            if hasattr(item, "messages"):
                pairs.append(chat.conversation_pieces([m.model_dump() for m in item.messages]))
            else:
                pairs.append((chat.prompt_pieces([{"role": "user", "content": item.prompt}]),
                              chat.response_pieces(item.response)))
        return self.encode_pieces(pairs)

    def encode_queries(self, queries: Sequence[str], keep: Keep = "end") -> list[Truncated]:
        """OpenRLHF queries are full templated texts: as is (their markers are special tokens
        by design), no BOS/EOS added, cut from the left (keep 'start': from the right)."""
        ids = self.tok.encode_kept([[(q, False)] for q in queries], keep, self.max_tokens)
        if keep == "start":
            return [Truncated(row[: self.max_tokens], len(row) > self.max_tokens) for row in ids]
        return [truncate_left(row, self.max_tokens) for row in ids]

    def encode_token_ids(self, rows: Sequence[Sequence[int]], keep: int) -> list[Truncated]:
        """Token-id inputs (vLLM /classify): scored as given, each cut to its last `keep` ids.

        Raises ValueError naming the first id the embedding table has no row for: such an id
        would fail inside the forward pass, for every request sharing that batch."""
        vocab = self.model.get_input_embeddings().num_embeddings
        for i, row in enumerate(rows):
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"input[{i}] holds token id {bad}, outside this model's vocabulary [0, {vocab})")
        return [truncate_left(row, keep) for row in rows]

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Raw logit per row. rows: B token-id lists of any lengths (right-padded here)."""
        B, T = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self._head is None:
            # No padding (one row, or equal lengths): no mask, so attention takes its fast path.
            no_pad = all(len(r) == T for r in rows)
            logits = self.model(input_ids=ids, attention_mask=None if no_pad else mask).logits  # (B, 1)
            return logits[:, 0].float().tolist()
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        last = mask.sum(dim=1) - 1  # (B,) index of each row's last real token
        pooled = hidden[torch.arange(B, device=self.device), last]  # (B, H)
        bias = None if self._head.bias is None else self._head.bias.float()
        logits = F.linear(pooled.float(), self._head.weight.float(), bias)  # (B, 1) in fp32
        return logits[:, 0].tolist()

    def init_thread(self) -> None:
        """Run in the thread that will call `score_ids`: with OpenMP, the thread count is per thread.

        On a busy 2-core machine one thread was steadier than two (no spinning OpenMP team
        waiting on a descheduled peer), hence the knob.
        """
        if self.opts.torch_threads:
            torch.set_num_threads(self.opts.torch_threads)

    def warmup(self) -> None:
        """First-call costs paid before /ready says 200: packed, one row per bucket (compiling
        each shape once) and the self-check; padded, one batch."""
        self.init_thread()
        if self.packed is not None:
            try:
                seconds = self.packed.warmup()
                self._check_packed()
            except Exception as exc:  # noqa: BLE001 -- as in enable_packing
                self._packing_failed(exc)
            else:
                p = self.packed
                log.info("packed scoring on: rows of %d tokens, buckets %s, attention %s, compile %s; "
                         "warm-up (compile included) %.1f s", p.row_tokens, p.buckets, p.attention,
                         p.options.compile, seconds)
                return
        row = self._tokenize(["warm up the model"])[0] or [self.pad_id]
        self.score_ids([self.prefix + row + self.suffix, self.prefix + row * 4 + self.suffix])

    @property
    def model_name(self) -> str:
        return self.opts.model_path


def load_engine(opts: EngineOptions) -> RewardEngine:
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    model, tokenizer = _load_model_and_tokenizer(opts, dtype)
    engine = RewardEngine(model, tokenizer, opts, device)
    engine.enable_packing()
    return engine
