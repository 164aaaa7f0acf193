"""Config of `crs-rlhf train-sft` (thesis values in the descriptions; defaults fit the tiny models)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from trainer.rm.loop import TrainSection


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SFTModelSection(_Section):
    base: str = Field(description="causal LM folder (with its tokenizer)")
    lora: bool = Field(
        False, description="LoRA on all linear layers (the thesis: true, r 16 / alpha 32). Default false: the "
        "tiny random policy has nothing for a low-rank update to adapt (eval loss 6.7 -> 3.4 full vs 6.0 LoRA)",
    )
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    merge: bool = Field(True, description="write merged weights (True) or the peft adapter folder (False)")
    max_tokens: int = Field(2048, description="threads are cut at this many tokens (thesis 2048)")


class SFTDataSection(_Section):
    path: str | None = Field(None, description="OASST file or datasets name (default: shipped fixture)")
    top_languages: int | None = Field(20, description="keep the N most frequent languages (thesis: top 20)")
    langs: list[str] | None = Field(None, description="explicit language list (overrides top_languages)")
    tree_states: list[str] | None = ["ready_for_export"]
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0


class SFTTrain(TrainSection):
    """Thesis SFT: Adam (0.9, 0.999, eps 1e-12), lr 1e-4 cosine, warmup 0.03, grad norm 0.3,
    grad accumulation 16, batch 4."""

    lr: float = 3e-3
    epochs: int = 8
    batch_size: int = 4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-12
    max_grad_norm: float = 1.0


class SFTConfig(_Section):
    """`crs-rlhf train-sft`: best-ranked OASST threads, loss on assistant tokens only."""

    output_dir: str = "runs/sft"
    model: SFTModelSection
    data: SFTDataSection = SFTDataSection()
    train: SFTTrain = SFTTrain()
