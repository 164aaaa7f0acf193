"""The one base of every config section (PPO, SFT, reward models, evaluation), and the model
section SFT and both reward models share.

Unknown keys are errors everywhere (`extra="forbid"`), so a typo in YAML names itself; field
names may start with ``model_`` (`protected_namespaces=()`). Every field carries a
`description`: `crs-rlhf config-docs` writes docs/config.md from them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Quantization = Literal["none", "8bit", "4bit"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def check_quantization(quantization: str, lora: bool) -> None:
    """A k-bit base cannot be trained itself: only an adapter on top of it."""
    if quantization != "none" and not lora:
        raise ValueError(f"model.quantization: {quantization} freezes the base in k-bit weights, which cannot be "
                         "fine-tuned fully: set model.lora: true (QLoRA) or model.quantization: none")


class LoRAModelSection(Section):
    """What SFT and both reward models share: LoRA on all linear layers, over a base that may be
    frozen in k-bit weights. Subclasses add `base` and their own `lora` default."""

    lora: bool = Field(True, description="LoRA adapters on all linear layers (False = full fine-tuning)")
    lora_r: int = Field(16, description="LoRA rank (thesis 16)")
    lora_alpha: int = Field(32, description="LoRA alpha: the update is scaled by alpha / r (thesis 32)")
    lora_dropout: float = Field(0.0, description="dropout on the LoRA input")
    merge: bool = Field(True, description="write merged weights (True) or the peft adapter folder (False)")
    quantization: Quantization = Field(
        "none", description="frozen base in 8bit / 4bit (NF4) under the LoRA adapter via bitsandbytes (CUDA only; "
        "pip install 'crs-rlhf[gpu]'); merged outputs are merged into the unquantized base")

    @model_validator(mode="after")
    def _quantized_needs_lora(self):
        check_quantization(self.quantization, self.lora)
        return self
