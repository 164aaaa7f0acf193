"""Reward-model plumbing (the shared pieces are in trainer.modeling).

Reward rows are encoded exactly as `services.reward.engine` encodes them (ChatML from
services.common.chat, prompt and response tokenized apart, the thesis truncation from
services.common.truncation) and pooled the same way: at each row's last REAL token, found
from the attention mask, with the score head in fp32, so a service scores a trained model
with the very numbers training saw (HF #27502: scores must not depend on padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.chat import format_prompt, format_response
from services.common.truncation import special_affixes, truncate_pair
from trainer.modeling import unwrap, wrap_lora
from trainer.train_device import TrainDevice, load_kwargs, place, prepare_base, upcast_trainable


def load_reward_model(base: str, tokenizer, td: TrainDevice, lora: dict | None,
                      gradient_checkpointing: bool = False) -> nn.Module:
    """`num_labels=1` sequence classifier from a causal-LM or classifier folder, LoRA optional,
    on `td`'s device in its dtypes (trained tensors fp32), k-bit base when `td` says so."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, **load_kwargs(td))
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_base(model, td, gradient_checkpointing)
    if lora is not None:
        # The fresh score head must be trained fully and saved with the adapter.
        model = wrap_lora(model, task="SEQ_CLS", save=("score",), **lora)
    return place(upcast_trainable(model), td)


def encode_reply(tokenizer, prompt: list[dict], reply: str, max_tokens: int, min_prompt_tokens: int) -> list[int]:
    """One (history, reply) row as token ids, truncated by the thesis rule."""
    p = tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
    r = tokenizer(format_response(reply), add_special_tokens=False)["input_ids"]
    pre, suf = special_affixes(tokenizer)
    return truncate_pair(p, r, max_tokens=max_tokens, min_prompt_tokens=min(min_prompt_tokens, max_tokens // 2),
                         prefix=pre, suffix=suf).ids


def reward_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Raw reward logit per row, (B,): backbone -> last real token -> score head in fp32."""
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    last = mask.sum(dim=1) - 1  # (B,)
    pooled = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # (B, H)
    head = inner.score
    if hasattr(head, "modules_to_save"):  # peft wrapper: the trained copy
        head = head.modules_to_save["default"]
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(ids.device.type, enabled=False):  # the head in fp32 even under bf16 autocast
        return F.linear(pooled.float(), head.weight.float(), bias)[:, 0]  # (B,)


