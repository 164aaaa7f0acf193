"""Where a base model came from: the thesis's warning about a LoRA-merged SFT under LoRA again.

The thesis's first chain (LoRA SFT, merged, then LoRA reward models and LoRA PPO on top: its
"double LoRA") diverged: the policy exploited the reward model's length bias until it wrote
gibberish (thesis Fig. 26, §6.3). Its final runs started from a fully fine-tuned SFT model
(Köpf et al.'s, three epochs on OASST). The presets follow the final runs; the LoRA-merged
chain still works, with this warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DOUBLE_LORA = ("{base} is a LoRA-merged SFT model (its config.yaml: model.lora true); a LoRA {stage} on top is the "
               "thesis's 'double LoRA' chain, which diverged (length exploitation, then gibberish: thesis Fig. 26, "
               "§6.3). Its final runs started from a fully fine-tuned SFT model: configs/thesis/sft_full.yaml")


def lora_merged_sft(base: str | Path) -> bool:
    """True when `base` is our SFT output trained with LoRA (read from the config.yaml it wrote)."""
    cfg = Path(base) / "config.yaml"
    if not cfg.is_file():
        return False
    try:
        doc = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    model = doc.get("model") if isinstance(doc, dict) else None
    return isinstance(model, dict) and "pre_sft" in doc and bool(model.get("lora"))


def warn_double_lora(base: str | Path, stage: str) -> bool:
    """Log the thesis's warning when a LoRA `stage` starts from a LoRA-merged SFT; True if it did."""
    if lora_merged_sft(base):
        log.warning(DOUBLE_LORA.format(base=base, stage=stage))
        return True
    return False
