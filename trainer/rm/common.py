"""Steps both reward trainers share: data loading with explained filters, model setup
(outputs and EmptyDataError are trainer.train_loop's, shared with SFT)."""

from __future__ import annotations

import logging

from trainer.data import TreeSplit, filter_trees, fixture_path, load_oasst, split_by_tree
from trainer.data.splits import held_out_split
from trainer.lineage import warn_double_lora
from trainer.modeling import load_tokenizer
from trainer.rm.config import DataSection, ModelSection
from trainer.rm.modeling import load_reward_model
from trainer.train_device import SINGLE, DistInfo, resolve_device
from trainer.train_loop import EmptyDataError, TrainSection

log = logging.getLogger(__name__)


def load_split(data: DataSection) -> tuple[TreeSplit, str]:
    """Filtered training trees (the held-out evaluation trees removed) split by tree into train and
    validation; also a sentence saying what each filter removed."""
    source = data.path or fixture_path("trees")
    trees = load_oasst(source)
    held = held_out_split(source, trees, data)
    trees = held.train(trees)
    filtered = filter_trees(trees, tree_states=data.tree_states, drop_deleted=data.drop_deleted,
                            drop_synthetic=data.drop_synthetic, drop_rejected=data.drop_rejected, langs=data.langs)
    story = (f"{data.path or 'fixture'}: {len(held.tree_ids)} held-out evaluation trees removed"
             f"{f' ({held.path.name})' if held.path else ''}; {filtered.report.describe()}")
    if not filtered.trees:
        raise EmptyDataError(f"no trees left after filtering ({story}); check data.langs / data.tree_states")
    return split_by_tree(filtered.trees, data.eval_fraction, data.split_seed), story


def require(items: list, what: str, story: str) -> list:
    if not items:
        raise EmptyDataError(f"no {what} after filtering and building ({story})")
    return items


def setup_model(model_cfg: ModelSection, train_cfg: TrainSection, info: DistInfo = SINGLE):
    """(model, tokenizer, TrainDevice): classifier on this rank's device, LoRA-wrapped when configured."""
    if model_cfg.lora and info.is_main:
        warn_double_lora(model_cfg.base, "reward model")
    td = resolve_device(train_cfg.precision, model_cfg.quantization, trains_base=not model_cfg.lora, info=info)
    tok = load_tokenizer(model_cfg.base)
    lora = {"r": model_cfg.lora_r, "alpha": model_cfg.lora_alpha, "dropout": model_cfg.lora_dropout} if model_cfg.lora else None
    model = load_reward_model(model_cfg.base, tok, td, lora, train_cfg.gradient_checkpointing)
    return model, tok, td
