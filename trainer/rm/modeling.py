"""Model plumbing shared by the reward-model and SFT trainers.

Reward rows are encoded exactly as `services.reward.engine` encodes them (ChatML from
services.common.chat, prompt and response tokenized apart, the thesis truncation from
services.common.truncation) and pooled the same way: at each row's last REAL token, found
from the attention mask, with the score head in fp32, so a service scores a trained model
with the very numbers training saw (HF #27502: scores must not depend on padding).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.common.chat import CHATML_JINJA, format_prompt, format_response, template_mismatch
from services.common.truncation import special_affixes, truncate_pair
from trainer.train_device import TrainDevice, load_kwargs, place, prepare_base, upcast_trainable

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """Tokenizer with a pad token; a missing one is set (unk, else eos) and logged.

    Training renders plain ChatML (services.common.chat). A chat template that renders
    otherwise (SmolLM2's adds a default system prompt) is replaced by ChatML, so the folder
    this run saves makes every chat endpoint serve the text the model was trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    mismatch = template_mismatch(tok)
    if mismatch:
        log.warning("base model %s: %s; training (and the saved tokenizer) use plain ChatML", path, mismatch)
        tok.chat_template = CHATML_JINJA
    if tok.pad_token is None:
        choice = tok.unk_token if tok.unk_token is not None and tok.unk_token != tok.eos_token else tok.eos_token
        if choice is None:
            raise ValueError(f"{path}: the tokenizer has no pad, unk or eos token to pad with; add a pad token")
        tok.pad_token = choice
        log.warning("base model %s has no pad token: using %r (rows are pooled by attention mask)", path, choice)
    tok.padding_side = "right"
    return tok


def linear_module_names(model: nn.Module, exclude: Sequence[str] = ("score", "lm_head", "classifier")) -> list[str]:
    """Leaf names of every nn.Linear except the heads: LoRA's 'all linear layers'."""
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - set(exclude))


def wrap_lora(model: nn.Module, r: int, alpha: int, dropout: float, task: str, save: Sequence[str] = ()):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=linear_module_names(model),
        modules_to_save=list(save) or None, task_type=task,
    )
    return get_peft_model(model, cfg)


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


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def encode_reply(tokenizer, prompt: list[dict], reply: str, max_tokens: int, min_prompt_tokens: int) -> list[int]:
    """One (history, reply) row as token ids, truncated by the thesis rule."""
    p = tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
    r = tokenizer(format_response(reply), add_special_tokens=False)["input_ids"]
    pre, suf = special_affixes(tokenizer)
    return truncate_pair(p, r, max_tokens=max_tokens, min_prompt_tokens=min(min_prompt_tokens, max_tokens // 2),
                         prefix=pre, suffix=suf).ids


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows -> ids (B, T), attention mask (B, T)."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


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


def save_model(model: nn.Module, tokenizer, out: Path, *, merge: bool, base: str) -> Path:
    """Write a folder `from_pretrained` (and the reward services) load unchanged.

    merge=True: adapter merged into the weights (plain model folder). merge=False: the peft
    adapter folder, whose adapter_config.json names the base by absolute path, plus the tokenizer.
    """
    out.mkdir(parents=True, exist_ok=True)
    is_peft = callable(getattr(model, "merge_and_unload", None))
    if is_peft and merge and getattr(unwrap(model), "hf_quantizer", None) is not None:
        # Merging into k-bit weights would round the update away: merge into the unquantized base.
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tokenizer, Path(tmp), merge=False, base=base)
            return merge_adapter(Path(tmp), out)
    if is_peft and not merge:
        model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve()) if Path(base).exists() else base
        model.save_pretrained(out, safe_serialization=True)
    else:
        plain = model.merge_and_unload() if is_peft else model
        plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def merge_adapter(adapter_dir: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A peft adapter folder -> merged weights in `out`, on CPU from the base it names (unquantized)."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig
    from transformers import AutoTokenizer

    task = PeftConfig.from_pretrained(adapter_dir).task_type
    cls = AutoPeftModelForSequenceClassification if task == "SEQ_CLS" else AutoPeftModelForCausalLM
    kwargs = {"num_labels": 1} if task == "SEQ_CLS" else {}
    model = cls.from_pretrained(adapter_dir, dtype=dtype, **kwargs)
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    model.config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
