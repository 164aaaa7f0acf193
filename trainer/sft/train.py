"""Supervised fine-tuning on OASST threads with the loss on assistant tokens only.

The thread is rendered once by `services.common.chat` (the exact text the policy sees at
rollout time); the assistant spans are located by character offsets in that text and mapped
to tokens through the fast tokenizer's offset mapping, so the label mask can never drift
from the template. Labelled: each reply's content and its ``<|im_end|>`` (the policy must
learn to stop); not labelled: user turns, role headers, BOS.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.common.chat import format_conversation, format_prompt, format_response
from services.common.truncation import special_affixes
from trainer.data import build_sft_threads, filter_trees, fixture_path, load_oasst, split_by_tree, top_languages
from trainer.data.splits import held_out_split
from trainer.modeling import load_tokenizer, pad_rows, save_model, wrap_lora
from trainer.sft.config import SFTConfig
from trainer.sft.instructions import load_instructions
from trainer.train_device import (
    DistInfo,
    distributed,
    load_kwargs,
    place,
    prepare_base,
    resolve_device,
    upcast_trainable,
)
from trainer.train_loop import EmptyDataError, cpu_threads, seed_everything, train_loop, write_outputs

log = logging.getLogger(__name__)
IGNORE = -100  # label id that cross-entropy skips


@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]  # ids on assistant tokens, IGNORE elsewhere


def assistant_spans(messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply + <|im_end|> in format_conversation(messages)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(format_prompt(messages[:i]))
            spans.append((start, start + len(format_response(m["content"]))))
    return spans


def encode_thread(tokenizer, messages: list[dict], max_tokens: int) -> SFTExample:
    """Token ids and labels of a thread (must end with an assistant turn); cut at max_tokens."""
    text = format_conversation(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_spans(messages)
    labels = [
        tid if any(s <= start < e for s, e in spans) else IGNORE
        for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    pre, suf = special_affixes(tokenizer)
    ids = pre + enc["input_ids"] + suf
    labels = [IGNORE] * len(pre) + labels + [IGNORE] * len(suf)
    return SFTExample(ids[:max_tokens], labels[:max_tokens])


def _batch(examples: list[SFTExample], pad_id: int, device) -> dict[str, torch.Tensor]:
    ids, mask = pad_rows([e.ids for e in examples], pad_id)  # (B, T)
    labels = torch.full_like(ids, IGNORE)  # (B, T)
    for i, e in enumerate(examples):
        labels[i, : len(e.labels)] = torch.as_tensor(e.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def labelled_tokens(examples: list[SFTExample]) -> int:
    """Tokens the loss averages over (shifted: a sequence's first token is never predicted)."""
    return sum(sum(lab != IGNORE for lab in e.labels[1:]) for e in examples)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, in fp32 whatever the logits' dtype.

    logits (B, T, V), labels (B, T) with IGNORE where no loss is taken.
    """
    vocab = logits.shape[-1]
    shifted = logits[:, :-1].float().reshape(-1, vocab)  # (B*(T-1), V)
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def micro_batch_loss(model, examples: list[SFTExample], pad_id: int, device) -> torch.Tensor:
    b = _batch(examples, pad_id, device)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
    return token_loss(logits, b["labels"])


@torch.no_grad()
def eval_loss(model, examples: list[SFTExample], pad_id: int, device, batch_size: int) -> float:
    """Mean token-level cross-entropy over assistant tokens."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        n = labelled_tokens(chunk)
        if n:
            total += float(micro_batch_loss(model, chunk, pad_id, device)) * n
            tokens += n
    return total / max(tokens, 1)


def sft_split(cfg: SFTConfig):
    """(TreeSplit train/validation of the trees left after the held-out evaluation trees, story)."""
    d = cfg.data
    source = d.path or fixture_path("trees")
    trees = load_oasst(source)
    held = held_out_split(source, trees, d)
    trees = held.train(trees)
    kept = filter_trees(trees, tree_states=d.tree_states, drop_rejected=d.drop_rejected).trees
    langs = d.langs or (top_languages(kept, d.top_languages) if d.top_languages else None)
    filtered = filter_trees(trees, tree_states=d.tree_states, langs=langs, drop_rejected=d.drop_rejected)
    story = (f"{d.path or 'fixture'}: {len(held.tree_ids)} held-out evaluation trees removed; "
             f"{filtered.report.describe()} (languages {langs}; {d.threads} threads)")
    return split_by_tree(filtered.trees, d.eval_fraction, d.split_seed), story


def load_threads(cfg: SFTConfig) -> tuple[list, list, str]:
    d = cfg.data
    split, story = sft_split(cfg)
    train = build_sft_threads(split.train, d.threads)
    if not train:
        raise EmptyDataError(f"no SFT threads after filtering ({story})")
    return train, build_sft_threads(split.eval, d.threads), story


def pre_sft_examples(cfg: SFTConfig, tok) -> list[SFTExample]:
    """The first stage's examples (empty when pre_sft.paths is empty)."""
    p = cfg.pre_sft
    convs = [c for path in p.paths for c in load_instructions(path, p.format, p.max_examples_per_file)]
    if p.paths and not convs:
        raise EmptyDataError(f"no instruction examples in {p.paths}")
    return [encode_thread(tok, c, cfg.model.max_tokens) for c in convs]


def train_sft(cfg: SFTConfig) -> Path:
    """Fine-tune, evaluate, write a causal-LM folder (+ tokenizer), metrics.json, config.yaml, README.md."""
    with cpu_threads(cfg.train.cpu_threads), distributed(cfg.train.dist_timeout_s) as info:
        return _train(cfg, info)


def _train(cfg: SFTConfig, info: DistInfo) -> Path:
    from transformers import AutoModelForCausalLM

    seed_everything(cfg.train.seed)
    out = Path(cfg.output_dir)
    train_threads, eval_threads, story = load_threads(cfg)
    m = cfg.model
    td = resolve_device(cfg.train.precision, m.quantization, trains_base=not m.lora, info=info)
    device = td.device
    tok = load_tokenizer(m.base)
    model = AutoModelForCausalLM.from_pretrained(m.base, **load_kwargs(td))
    model.config.pad_token_id = tok.pad_token_id
    model = prepare_base(model, td, cfg.train.gradient_checkpointing)
    if m.lora:
        model = wrap_lora(model, m.lora_r, m.lora_alpha, m.lora_dropout, task="CAUSAL_LM")
    model = place(upcast_trainable(model), td)
    train_ex = [encode_thread(tok, t, m.max_tokens) for t in train_threads]
    eval_ex = [encode_thread(tok, t, m.max_tokens) for t in eval_threads] or train_ex
    pad, bs = tok.pad_token_id, cfg.train.batch_size
    loss_fn = lambda mdl, b: micro_batch_loss(mdl, b, pad, device)
    with td.autocast():  # every rank evaluates (same numbers; no rank idles at a collective meanwhile)
        before = eval_loss(model, eval_ex, pad, device, bs)
    pre = pre_sft_examples(cfg, tok)
    pre_metrics = {}
    if pre:  # stage 1 on instruction data; its own checkpoint folder, so a resume knows which stage it is in
        stage = cfg.train.model_copy(update={"epochs": cfg.pre_sft.epochs, "max_steps": cfg.pre_sft.max_steps})
        r1 = train_loop(model, pre, loss_fn, stage, out / "checkpoint-pre-sft", desc="pre-sft",
                        units=labelled_tokens, dev=td)
        with td.autocast():
            after_pre = eval_loss(model, eval_ex, pad, device, bs)
        pre_metrics = {"pre_sft_examples": len(pre), "pre_sft_steps": r1.steps, "pre_sft_loss_history": r1.losses,
                       "eval_loss_after_pre_sft": after_pre}
    result = train_loop(model, train_ex, loss_fn, cfg.train, out / "checkpoint", desc="sft",
                        units=labelled_tokens, dev=td)
    if not info.is_main:
        return out
    with td.autocast():
        after = eval_loss(model, eval_ex, pad, device, bs)
    metrics = {"eval_loss": after, "initial_eval_loss": before, "eval_perplexity": math.exp(min(after, 50.0)),
               "train_threads": len(train_ex), "eval_threads": len(eval_threads), "steps": result.steps,
               "train_loss_history": result.losses, "data": story, **pre_metrics}
    save_model(model, tok, out, merge=m.merge, base=m.base)
    card = (f"# SFT policy (crs-rlhf)\n\nCausal LM from `{m.base}`, {'LoRA' if m.lora else 'full fine-tuning'}, "
            f"{'merged' if m.merge or not m.lora else 'peft adapter'}. ChatML threads (best-ranked OASST replies"
            f"{', after a first stage on ' + str(len(pre)) + ' instruction examples' if pre else ''}), "
            f"loss on assistant tokens only.\n\neval_loss {after:.4f} (before {before:.4f}), {result.steps} steps.\n"
            f"Data: {story}. Full config: `config.yaml`.\n")
    write_outputs(out, cfg, metrics, card)
    return out
