"""Preference reward model: ranked OASST replies -> a scalar logit (`train_preference_rm`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainer.data import PreferenceSet, build_preference_sets
from trainer.rm.common import load_split, require, setup_model
from trainer.rm.config import PreferenceRMConfig
from trainer.train_loop import cpu_threads, seed_everything, train_loop, write_outputs
from trainer.rm.losses import pairwise_stats, ranked_set_loss
from trainer.modeling import pad_rows, save_model
from trainer.rm.modeling import encode_reply, reward_scores
from trainer.train_device import DistInfo, distributed

log = logging.getLogger(__name__)


class _Encoded:
    """A ranked set as token rows, best first (tokenized once, before training)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows


def _encode(sets: list[PreferenceSet], tok, cfg: PreferenceRMConfig) -> list[_Encoded]:
    m = cfg.model
    return [_Encoded([encode_reply(tok, s.prompt, r, m.max_tokens, m.min_prompt_tokens) for r in s.replies]) for s in sets]


def _scores(model, batch: list[_Encoded], pad_id: int, device) -> tuple[torch.Tensor, list[int]]:
    rows = [r for item in batch for r in item.rows]
    ids, mask = pad_rows(rows, pad_id)
    return reward_scores(model, ids.to(device), mask.to(device)), [len(item.rows) for item in batch]


@torch.no_grad()
def evaluate(model, data: list[_Encoded], cfg: PreferenceRMConfig, pad_id: int, device, prefix: str) -> dict:
    """Loss (the training objective), pairwise accuracy and mean margin r_w - r_l."""
    if not data:
        return {}
    model.eval()
    bs = cfg.train.batch_size
    losses, scores, sizes = [], [], []
    for i in range(0, len(data), bs):
        s, k = _scores(model, data[i : i + bs], pad_id, device)
        losses.append(float(ranked_set_loss(s, k, cfg.loss.l2, cfg.loss.average)) * len(k))
        scores += s.tolist()
        sizes += k
    correct, total, margin = pairwise_stats(scores, sizes)
    return {f"{prefix}_loss": sum(losses) / len(data), f"{prefix}_pairwise_accuracy": correct / total,
            f"{prefix}_mean_margin": margin / total, f"{prefix}_pairs": total, f"{prefix}_sets": len(data)}


def train_preference_rm(cfg: PreferenceRMConfig) -> Path:
    """Train, evaluate, write the run folder; returns the model folder (= cfg.output_dir).
    Under torchrun every rank trains its share of each batch; rank 0 writes."""
    with cpu_threads(cfg.train.cpu_threads), distributed(cfg.train.dist_timeout_s) as info:
        return _train(cfg, info)


def loss_terms(batch: list[_Encoded], average: str) -> int:
    """Terms the loss averages over: sets ('prompt') or all C(K,2) pairs ('pair')."""
    return len(batch) if average == "prompt" else sum(len(s.rows) * (len(s.rows) - 1) // 2 for s in batch)


def _train(cfg: PreferenceRMConfig, info: DistInfo) -> Path:
    """Train, evaluate, and write the model folder + metrics.json + config.yaml + README.md."""
    seed_everything(cfg.train.seed)
    out = Path(cfg.output_dir)
    split, story = load_split(cfg.data)
    train_sets = require(build_preference_sets(split.train, max_replies=cfg.loss.max_replies), "training preference sets", story)
    eval_sets = build_preference_sets(split.eval, max_replies=cfg.loss.max_replies)
    model, tok, td = setup_model(cfg.model, cfg.train, info)
    device = td.device
    train_data, eval_data = _encode(train_sets, tok, cfg), _encode(eval_sets, tok, cfg)
    pad = tok.pad_token_id

    with td.autocast():  # every rank evaluates everything (same numbers, no waiting on rank 0)
        before = evaluate(model, eval_data, cfg, pad, device, "eval")

    def loss_fn(m, batch):
        s, k = _scores(m, batch, pad, device)
        return ranked_set_loss(s, k, cfg.loss.l2, cfg.loss.average)

    result = train_loop(model, train_data, loss_fn, cfg.train, out / "checkpoint", desc="rm-preference",
                        units=lambda b: loss_terms(b, cfg.loss.average), dev=td)
    if not info.is_main:
        return out
    with td.autocast():
        metrics = {**evaluate(model, eval_data, cfg, pad, device, "eval"),
                   **evaluate(model, train_data, cfg, pad, device, "train")}
    metrics.update(initial_eval_loss=before.get("eval_loss"), initial_eval_pairwise_accuracy=before.get("eval_pairwise_accuracy"),
                   steps=result.steps, train_loss_history=result.losses, data=story)
    save_model(model, tok, out, merge=cfg.model.merge, base=cfg.model.base)
    write_outputs(out, cfg, metrics, _card(cfg, metrics))
    return out


def _card(cfg: PreferenceRMConfig, m: dict) -> str:
    return f"""# Preference reward model (crs-rlhf)

Sequence classifier (`num_labels=1`) from `{cfg.model.base}`, {f'LoRA r{cfg.model.lora_r}/alpha{cfg.model.lora_alpha}' if cfg.model.lora else 'full fine-tuning'},
{'merged weights' if cfg.model.merge or not cfg.model.lora else 'peft adapter'}. Input: ChatML (`services.common.chat`); output: a raw logit.
Loss: -log sigmoid(r_w - r_l) over all C(K,2) pairs, L2 {cfg.loss.l2}, averaged per {cfg.loss.average}.

| split | sets | pairs | loss | pairwise accuracy | mean margin |
| --- | --- | --- | --- | --- | --- |
| train | {m.get('train_sets')} | {m.get('train_pairs')} | {m.get('train_loss', float('nan')):.4f} | {m.get('train_pairwise_accuracy', float('nan')):.3f} | {m.get('train_mean_margin', float('nan')):.3f} |
| eval | {m.get('eval_sets', 0)} | {m.get('eval_pairs', 0)} | {m.get('eval_loss', float('nan')):.4f} | {m.get('eval_pairwise_accuracy', float('nan')):.3f} | {m.get('eval_mean_margin', float('nan')):.3f} |

Data: {m['data']}. Steps: {m['steps']}. Full config: `config.yaml`.
"""
