"""Configs of `crs-rlhf train-rm` (one pydantic model per command; unknown keys are errors).

Defaults run on the shipped fixture and the tiny models in well under a minute; each field
says the thesis value where it differs (docs/method.md); `configs/thesis/` has the thesis's runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.data.splits import HeldOutOptions
from trainer.rm.augment import AugmentSection
from trainer.train_device import Quantization
from trainer.train_loop import TrainSection


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_quantization(quantization: str, lora: bool) -> None:
    """A k-bit base cannot be trained itself: only an adapter on top of it."""
    if quantization != "none" and not lora:
        raise ValueError(f"model.quantization: {quantization} freezes the base in k-bit weights, which cannot be "
                         "fine-tuned fully: set model.lora: true (QLoRA) or model.quantization: none")


class LoRAModelSection(_Section):
    """What SFT and both reward models share: LoRA on all linear layers, over a base that may be
    frozen in k-bit weights. Subclasses add `base` and their own `lora` default."""

    lora: bool = Field(True, description="LoRA adapters on all linear layers (False = full fine-tuning)")
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    merge: bool = Field(True, description="write merged weights (True) or the peft adapter folder (False)")
    quantization: Quantization = Field(
        "none", description="frozen base in 8bit / 4bit (NF4) under the LoRA adapter via bitsandbytes (CUDA only; "
        "pip install 'crs-rlhf[gpu]'); merged outputs are merged into the unquantized base")

    @model_validator(mode="after")
    def _quantized_needs_lora(self):
        check_quantization(self.quantization, self.lora)
        return self


class ModelSection(LoRAModelSection):
    base: str = Field(description="base model folder: the SFT model, any causal LM, or a num_labels=1 classifier")
    max_tokens: int = Field(2048, description="truncation limit (thesis 2048)")
    min_prompt_tokens: int = Field(256, description="the prompt keeps at least this many tokens (thesis 256)")


class DataSection(HeldOutOptions):
    """Rows of the trees left after the held-out evaluation trees (the data's split file) are
    removed; `eval_fraction` of those trees is this stage's own validation set."""

    path: str | None = Field(None, description="OASST trees/messages file or datasets name (default: shipped fixture)")
    langs: list[str] | None = Field(["en", "es", "fr", "de"], description="root languages kept (None = all)")
    tree_states: list[str] | None = Field(default_factory=lambda: ["ready_for_export"])
    drop_deleted: bool = True
    drop_synthetic: bool = True
    drop_rejected: bool = Field(True, description="drop messages whose review_result is false (with their replies)")
    eval_fraction: float = Field(0.15, ge=0, lt=1, description="validation share of the training TREES")
    split_seed: int = Field(0, description="seed of the validation split")


class PreferenceLossSection(_Section):
    l2: float = Field(0.001, ge=0, description="Open Assistant's 0.001 * 0.5 * (r_w^2 + r_l^2) per pair (0 = off)")
    average: Literal["prompt", "pair"] = Field("prompt", description="'prompt' (OA) or 'pair' (TRL)")
    max_replies: int = Field(4, ge=2, le=8, description="top ranked replies kept per prompt")


class PreferenceTrain(TrainSection):
    # Subclass defaults (not an instance default) so a partial YAML `train:` keeps them.
    lr: float = 2e-3
    epochs: int = 4
    batch_size: int = 4


class PreferenceRMConfig(_Section):
    """`crs-rlhf train-rm preference`: ranked replies -> one reward logit."""

    output_dir: str = "runs/rm-preference"
    model: ModelSection
    data: DataSection = DataSection()
    loss: PreferenceLossSection = PreferenceLossSection()
    train: PreferenceTrain = PreferenceTrain()


class AbsoluteLossSection(_Section):
    kind: Literal["logistic", "sigmoid_mse", "mse_penalty"] = Field("logistic", description="thesis choice: logistic")
    penalty: float = Field(0.02, ge=0, description="mse_penalty: weight of the out-of-[0, 1] penalty (thesis 0.02)")
    penalty_form: Literal["linear", "squared"] = Field(
        "linear", description="mse_penalty: penalty on the excess itself (thesis) or on its square")


class AbsoluteTrain(TrainSection):
    lr: float = 2e-3
    epochs: int = 6
    batch_size: int = 8


class AbsoluteRMConfig(_Section):
    """`crs-rlhf train-rm absolute`: each reply's own rating -> one reward logit."""

    output_dir: str = "runs/rm-absolute"
    model: ModelSection
    data: DataSection = DataSection()
    weighting: str | dict[str, float] = Field("quality", description="w2, w3, quality (thesis final) or {label: weight}")
    rows: Literal["ranked", "labelled"] = Field(
        "ranked", description="'ranked' (thesis): replies of the ranked sets with all six labels; 'labelled': "
        "every labelled reply, only the weighting's labels required")
    skip_close_high: bool = Field(
        False, description="the thesis code's near-duplicate skip: drop a non-best reply of a set whose target is "
        ">= 0.6 and within 0.05 of the best reply's (the thesis text does not say whether its counts include it)")
    loss: AbsoluteLossSection = AbsoluteLossSection()
    remedies: list[str] = Field(
        default_factory=list, description="any of augment, over_s[_F|_N], under_s_N, wgt_s_X, wgt_A_B (thesis "
        "best: augment, under_s_8k, wgt_s_075)"
    )
    augment: AugmentSection = AugmentSection()
    train: AbsoluteTrain = AbsoluteTrain()
