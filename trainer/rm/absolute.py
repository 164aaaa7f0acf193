"""Absolute reward model: each reply's own (weighted) rating -> a logit (`train_absolute_rm`).

Metrics follow the thesis's Tables 6-7: MSE and MAE separately for targets below 0.4, at
or above 0.9, and in between, because an overall MSE hides the rare low end that matters
most for RL (a reward model that never predicts "bad" still scores a low overall MSE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data import AbsoluteRow, build_absolute_rows, with_targets
from trainer.data.builders import skip_close_to_best
from trainer.data.labels import SIX_LABELS
from trainer.rm.augment import augment_rows
from trainer.rm.common import load_split, require, setup_model
from trainer.rm.config import AbsoluteRMConfig
from trainer.train_loop import cpu_threads, seed_everything, train_loop, write_outputs
from trainer.rm.losses import absolute_loss, prediction
from trainer.modeling import pad_rows, save_model
from trainer.rm.modeling import encode_reply, reward_scores
from trainer.rm.report import range_metrics, write_histogram, write_table
from trainer.rm.sampling import label_range, low_weights, over_sample, parse_remedies, range_counts, under_sample_mid
from trainer.train_device import SINGLE, DistInfo, broadcast_object, distributed

log = logging.getLogger(__name__)


@dataclass
class _Item:
    ids: list[int]
    target: float
    weight: float = 1.0


@dataclass
class TrainingSet:
    rows: list[AbsoluteRow]
    weights: list[float]
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    augmented: int = 0


def apply_remedies(rows: list[AbsoluteRow], cfg: AbsoluteRMConfig, info: DistInfo = SINGLE) -> TrainingSet:
    """augment -> over_s -> under_s_N -> wgt_s_X, in the thesis's order (see sampling.py).
    Under torchrun rank 0 alone paraphrases (sampled text) and hands the rows to the others."""
    rem = parse_remedies(cfg.remedies)
    seed = cfg.train.seed
    before = range_counts([r.target for r in rows])
    added = 0
    if rem.augment:
        low = [r for r in rows if label_range(r.target) == "low"]
        new = augment_rows(low, cfg.augment, cfg.model.base, seed).rows if info.is_main else None
        new = broadcast_object(new, info)
        rows, added = rows + new, len(new)
    if rem.over_s or rem.over_s_to:
        rows = [rows[i] for i in over_sample([r.target for r in rows], rem.over_s or 2.0, seed, to=rem.over_s_to)]
    if rem.under_s:
        rows = [rows[i] for i in under_sample_mid([r.target for r in rows], rem.under_s, seed)]
    targets = [r.target for r in rows]
    if rem.wgt_s or rem.wgt_fixed:
        weights = low_weights(targets, rem.wgt_s or rem.wgt_fixed, fixed=bool(rem.wgt_fixed))
    else:
        weights = [1.0] * len(rows)
    return TrainingSet(rows, weights, before, range_counts(targets), added)


def _batch(model, items: list[_Item], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_rows([it.ids for it in items], pad_id)
    z = reward_scores(model, ids.to(device), mask.to(device))  # (B,)
    t = torch.tensor([it.target for it in items], device=device)  # (B,)
    w = torch.tensor([it.weight for it in items], device=device)  # (B,)
    return z, t, w


@torch.no_grad()
def predict(model, items: list[_Item], cfg: AbsoluteRMConfig, pad_id: int, device) -> tuple[list[float], float]:
    """(predictions in target space, mean unweighted loss)."""
    model.eval()
    preds, loss_sum = [], 0.0
    bs = cfg.train.batch_size
    for i in range(0, len(items), bs):
        z, t, _ = _batch(model, items[i : i + bs], pad_id, device)
        loss_sum += float(absolute_loss(z, t, cfg.loss.kind, penalty=cfg.loss.penalty,
                                        penalty_form=cfg.loss.penalty_form)) * len(t)
        preds += prediction(z, cfg.loss.kind).tolist()
    return preds, loss_sum / max(len(items), 1)


def train_absolute_rm(cfg: AbsoluteRMConfig) -> Path:
    """Train, evaluate, write the run folder; returns the model folder (= cfg.output_dir)."""
    with cpu_threads(cfg.train.cpu_threads), distributed(cfg.train.dist_timeout_s) as info:
        return _train(cfg, info)


def _train(cfg: AbsoluteRMConfig, info: DistInfo) -> Path:
    """Train, evaluate per label range, write model folder, metrics.json/.md, histogram PNG, card."""
    seed_everything(cfg.train.seed)
    out = Path(cfg.output_dir)
    split, story = load_split(cfg.data)
    source, required = (cfg.rows, SIX_LABELS) if cfg.rows == "ranked" else (cfg.rows, None)
    train_l = with_targets(build_absolute_rows(split.train, source, required), cfg.weighting)
    eval_l = with_targets(build_absolute_rows(split.eval, source, required), cfg.weighting)
    if cfg.skip_close_high:
        n = len(train_l.rows) + len(eval_l.rows)
        train_l.rows, eval_l.rows = skip_close_to_best(train_l.rows), skip_close_to_best(eval_l.rows)
        story += f"; {n - len(train_l.rows) - len(eval_l.rows)} near-duplicate high replies skipped"
    story += f"; {train_l.dropped + eval_l.dropped} replies dropped for missing labels {train_l.missing}"
    require(train_l.rows, "labelled training replies", story)
    model, tok, td = setup_model(cfg.model, cfg.train, info)
    device = td.device
    tset = apply_remedies(train_l.rows, cfg, info)
    m = cfg.model
    enc = lambda r: encode_reply(tok, r.prompt, r.reply, m.max_tokens, m.min_prompt_tokens)
    train_items = [_Item(enc(r), r.target, w) for r, w in zip(tset.rows, tset.weights)]
    eval_items = [_Item(enc(r), r.target) for r in eval_l.rows] or train_items  # no eval trees: report on train
    pad = tok.pad_token_id
    with td.autocast():
        _, initial_loss = predict(model, eval_items, cfg, pad, device)

    def loss_fn(mdl, batch):
        z, t, w = _batch(mdl, batch, pad, device)
        return absolute_loss(z, t, cfg.loss.kind, w, cfg.loss.penalty, cfg.loss.penalty_form)

    # The loss is a mean over rows (weights scale terms, they do not divide): shards weigh by rows.
    result = train_loop(model, train_items, loss_fn, cfg.train, out / "checkpoint", desc="rm-absolute",
                        units=len, dev=td)
    if not info.is_main:
        return out
    with td.autocast():
        preds, eval_loss = predict(model, eval_items, cfg, pad, device)
    targets = [it.target for it in eval_items]
    metrics = {"eval_loss": eval_loss, "initial_eval_loss": initial_loss, **range_metrics(preds, targets),
               "eval_rows": len(eval_items), "train_rows": len(train_items), "steps": result.steps,
               "remedies": parse_remedies(cfg.remedies).names(), "augmented_rows": tset.augmented,
               "train_ranges_before": tset.counts_before, "train_ranges_after": tset.counts_after,
               "train_loss_history": result.losses, "data": story}
    save_model(model, tok, out, merge=cfg.model.merge, base=cfg.model.base)
    table = write_table(out / "metrics.md", metrics)
    write_histogram(out / "predictions.png", preds, targets, title=f"absolute RM ({cfg.loss.kind})")
    write_outputs(out, cfg, metrics, _card(cfg, metrics, table))
    return out


def _card(cfg: AbsoluteRMConfig, m: dict, table: str) -> str:
    return f"""# Absolute reward model (crs-rlhf)

Sequence classifier (`num_labels=1`) from `{cfg.model.base}`, {'LoRA' if cfg.model.lora else 'full fine-tuning'},
{'merged weights' if cfg.model.merge or not cfg.model.lora else 'peft adapter'}. Input: ChatML (`services.common.chat`).
Target: label weighting `{cfg.weighting}`; loss `{cfg.loss.kind}`; remedies {m['remedies'] or 'none'}.
Serve the raw logit as r_abs (docs/method.md); sigmoid(logit) is the predicted rating{' (mse_penalty: the logit itself)' if cfg.loss.kind == 'mse_penalty' else ''}.

{table}
Train rows per range before/after remedies: {m['train_ranges_before']} -> {m['train_ranges_after']}.
Data: {m['data']}. Histogram: `predictions.png`. Full config: `config.yaml`.
"""
