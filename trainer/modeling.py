"""Model plumbing SFT and both reward-model trainers share: the tokenizer with a pad token,
LoRA on all linear layers, right-padded rows, and writing a model folder (merged or adapter)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from services.common.chat import CHATML_JINJA, template_mismatch

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


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows -> ids (B, T), attention mask (B, T)."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


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
