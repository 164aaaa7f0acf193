"""The scoring engine: load a reward model, turn items into token ids, score padded batches.

No FastAPI here; the batcher calls `score_ids` from its one worker thread, the routes call
the `encode_*` methods. Two rules carry the correctness:

* An item's score must not depend on its batch (the thesis hit transformers issue 27502,
  where scores moved with the amount of padding). Rows are right-padded and each row is
  pooled at its LAST REAL TOKEN, found from the attention mask, never from a pad/EOS id.
* The text is the training text: ChatML via services.common.chat, prompt and response
  tokenized separately so the prompt can be cut from its beginning (truncation.py). What a
  user or a policy wrote is text: its special-token strings stay text (tokenize.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.common.chat import CHATML, ChatFormat
from services.common.tokenize import Piece, ThreadTokenizer
from services.common.truncation import Truncated, special_affixes, truncate_left, truncate_pair

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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


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

    def encode_queries(self, queries: Sequence[str]) -> list[Truncated]:
        """OpenRLHF queries are full templated texts: as is (their markers are special tokens
        by design), no BOS/EOS added, cut from the left."""
        ids = self.tok.encode_kept([[(q, False)] for q in queries], "end", self.max_tokens)
        return [truncate_left(row, self.max_tokens) for row in ids]

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
        """One padded batch through the model: first-call costs are paid before /ready says 200."""
        self.init_thread()
        row = self._tokenize(["warm up the model"])[0] or [self.pad_id]
        self.score_ids([self.prefix + row + self.suffix, self.prefix + row * 4 + self.suffix])

    @property
    def model_name(self) -> str:
        return self.opts.model_path


def load_engine(opts: EngineOptions) -> RewardEngine:
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    model, tokenizer = _load_model_and_tokenizer(opts, dtype)
    return RewardEngine(model, tokenizer, opts, device)
