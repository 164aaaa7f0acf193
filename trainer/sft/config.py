"""Config of `crs-rlhf train-sft` (thesis values in the descriptions; defaults fit the tiny models)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.config_base import LoRAModelSection, Section
from trainer.data.splits import HeldOutOptions
from trainer.train_loop import TrainSection


class SFTModelSection(LoRAModelSection):
    base: str = Field(description="causal LM folder (with its tokenizer)")
    lora: bool = Field(
        False, description="LoRA on all linear layers (the thesis: true, r 16 / alpha 32). Default false: the "
        "tiny random policy has nothing for a low-rank update to adapt (eval loss 6.7 -> 3.4 full vs 6.0 LoRA)",
    )
    max_tokens: int = Field(2048, description="threads are cut at this many tokens (thesis 2048)")


class SFTDataSection(HeldOutOptions):
    """Threads of the trees left after the held-out evaluation trees (the data's split file) are
    removed; `eval_fraction` of those trees is this stage's own validation set."""

    path: str | None = Field(None, description="OASST file or datasets name (default: shipped fixture)")
    top_languages: int | None = Field(20, description="keep the N most frequent languages (thesis: top 20)")
    langs: list[str] | None = Field(None, description="explicit language list (overrides top_languages)")
    tree_states: list[str] | None = Field(default_factory=lambda: ["ready_for_export"],
                                          description="tree states kept (None = all)")
    threads: Literal["best_ranked", "greedy"] = Field(
        "best_ranked", description="'best_ranked' (Open Assistant, thesis): every thread along best-ranked or "
        "unranked replies; 'greedy': one thread per tree")
    drop_rejected: bool = Field(True, description="drop messages whose review_result is false (with their replies)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="validation share of the training trees (thesis: 0.05)")
    split_seed: int = Field(0, description="seed of the validation split")


class PreSFTSection(Section):
    """Optional first stage on instruction data (the thesis: Alpaca, Dolly, GSM8K), then OASST."""

    paths: list[str] = Field(default_factory=list, description="Alpaca/Dolly/GSM8K JSON or JSONL files; empty = no stage")
    format: Literal["auto", "alpaca", "dolly", "gsm8k"] = Field("auto", description="file format; auto = detect from the keys")
    max_examples_per_file: int | None = Field(None, ge=1, description="use at most this many examples of each file")
    epochs: int = Field(1, ge=1, description="passes over the instruction data")
    max_steps: int | None = Field(None, ge=1, description="stop the first stage after this many optimizer steps")


class SFTTrain(TrainSection):
    """Thesis SFT: Adam (0.9, 0.999, eps 1e-12), lr 1e-4 cosine, warmup 0.03, grad norm 0.3,
    grad accumulation 16, batch 4."""

    lr: float = 3e-3
    epochs: int = 8
    batch_size: int = 4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-12
    max_grad_norm: float = 1.0


class SFTConfig(Section):
    """`crs-rlhf train-sft`: best-ranked OASST threads, loss on assistant tokens only."""

    output_dir: str = Field("runs/sft", description="where the model (or adapter), metrics.json, config.yaml and README.md go")
    model: SFTModelSection = Field(description="the base model and how it is fine-tuned")
    data: SFTDataSection = Field(default_factory=SFTDataSection, description="which OASST threads")
    pre_sft: PreSFTSection = Field(default_factory=PreSFTSection, description="an optional first stage on instruction data")
    train: SFTTrain = Field(default_factory=SFTTrain, description="optimisation")
