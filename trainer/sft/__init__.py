"""Supervised fine-tuning: ``train_sft(SFTConfig) -> Path`` (the output causal-LM folder)."""

from trainer.sft.config import SFTConfig
from trainer.sft.train import train_sft

__all__ = ["SFTConfig", "train_sft"]
