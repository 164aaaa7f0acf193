"""Configs of `crs-rlhf train-rm` (one pydantic model per command; unknown keys are errors).

Defaults run on the shipped fixture and the tiny models in well under a minute; each field
says the thesis value where it differs (docs/method.md); `configs/thesis/` has the thesis's runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.config_base import LoRAModelSection, Section
from trainer.data.splits import HeldOutOptions
from trainer.rm.augment import AugmentSection
from trainer.train_loop import TrainSection


class ModelSection(LoRAModelSection):
    base: str = Field(description="base model folder: the SFT model, any causal LM, or a num_labels=1 classifier")
    max_tokens: int = Field(2048, description="truncation limit (thesis 2048)")
    min_prompt_tokens: int = Field(256, description="the prompt keeps at least this many tokens (thesis 256)")


class DataSection(HeldOutOptions):
    """Rows of the trees left after the held-out evaluation trees (the data's split file) are
    removed; `eval_fraction` of those trees is this stage's own validation set."""

    path: str | None = Field(None, description="OASST trees/messages file or datasets name (default: shipped fixture)")
    langs: list[str] | None = Field(["en", "es", "fr", "de"], description="root languages kept (None = all)")
    tree_states: list[str] | None = Field(default_factory=lambda: ["ready_for_export"],
                                          description="tree states kept (None = all)")
    drop_deleted: bool = Field(True, description="drop deleted messages (with their replies)")
    drop_synthetic: bool = Field(True, description="drop synthetic (machine-written) messages (with their replies)")
    drop_rejected: bool = Field(True, description="drop messages whose review_result is false (with their replies)")
    eval_fraction: float = Field(0.15, ge=0, lt=1, description="validation share of the training TREES")
    split_seed: int = Field(0, description="seed of the validation split")


class PreferenceLossSection(Section):
    l2: float = Field(0.001, ge=0, description="Open Assistant's 0.001 * 0.5 * (r_w^2 + r_l^2) per pair (0 = off)")
    average: Literal["prompt", "pair"] = Field("prompt", description="'prompt' (OA) or 'pair' (TRL)")
    max_replies: int = Field(4, ge=2, le=8, description="top ranked replies kept per prompt")


class PreferenceTrain(TrainSection):
    # Subclass defaults (not an instance default) so a partial YAML `train:` keeps them.
    lr: float = 2e-3
    epochs: int = 4
    batch_size: int = 4


class PreferenceRMConfig(Section):
    """`crs-rlhf train-rm preference`: ranked replies -> one reward logit."""

    output_dir: str = Field("runs/rm-preference", description="where the model, metrics.json, config.yaml and README.md go")
    model: ModelSection = Field(description="the base model and how it is fine-tuned")
    data: DataSection = Field(default_factory=DataSection, description="which OASST trees")
    loss: PreferenceLossSection = Field(default_factory=PreferenceLossSection, description="the ranking loss")
    train: PreferenceTrain = Field(default_factory=PreferenceTrain, description="optimisation")


class AbsoluteLossSection(Section):
    kind: Literal["logistic", "sigmoid_mse", "mse_penalty"] = Field("logistic", description="thesis choice: logistic")
    penalty: float = Field(0.02, ge=0, description="mse_penalty: weight of the out-of-[0, 1] penalty (thesis 0.02)")
    penalty_form: Literal["linear", "squared"] = Field(
        "linear", description="mse_penalty: penalty on the excess itself (thesis) or on its square")


class AbsoluteTrain(TrainSection):
    lr: float = 2e-3
    epochs: int = 6
    batch_size: int = 8


class AbsoluteRMConfig(Section):
    """`crs-rlhf train-rm absolute`: each reply's own rating -> one reward logit."""

    output_dir: str = Field("runs/rm-absolute", description="where the model, metrics.json, config.yaml and README.md go")
    model: ModelSection = Field(description="the base model and how it is fine-tuned")
    data: DataSection = Field(default_factory=DataSection, description="which OASST trees")
    weighting: str | dict[str, float] = Field("quality", description="w2, w3, quality (thesis final) or {label: weight}")
    rows: Literal["ranked", "labelled"] = Field(
        "ranked", description="'ranked' (thesis): replies of the ranked sets with all six labels; 'labelled': "
        "every labelled reply, only the weighting's labels required")
    skip_close_high: bool = Field(
        False, description="the thesis code's near-duplicate skip: drop a non-best reply of a set whose target is "
        ">= 0.6 and within 0.05 of the best reply's (the thesis text does not say whether its counts include it)")
    loss: AbsoluteLossSection = Field(default_factory=AbsoluteLossSection, description="the regression loss")
    remedies: list[str] = Field(
        default_factory=list, description="any of augment, over_s[_F|_N], under_s_N, wgt_s_X, wgt_A_B (thesis "
        "best: augment, under_s_8k, wgt_s_075)"
    )
    augment: AugmentSection = Field(default_factory=AugmentSection, description="paraphrasing low-rated replies "
                                    "(the `augment` remedy)")
    train: AbsoluteTrain = Field(default_factory=AbsoluteTrain, description="optimisation")
