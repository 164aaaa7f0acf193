"""The thesis presets' SFT lineage: a LoRA-merged SFT under LoRA again warns with the thesis's
reason (the "double LoRA" chain diverged, Fig. 26), a fully fine-tuned one does not; the 8-bit
optimizer that makes full fine-tuning of a 7B fit refuses clearly where it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from trainer.config_io import dump_config
from trainer.lineage import lora_merged_sft, warn_double_lora
from trainer.sft.config import SFTConfig
from trainer.train_loop import TrainSection, make_optimizer


@pytest.mark.parametrize("lora", [True, False])
def test_double_lora_warning_names_the_thesiss_reason(tmp_path, caplog, lora):
    dump_config(SFTConfig(model={"base": "b", "lora": lora}), tmp_path / "config.yaml")  # what train-sft writes
    with caplog.at_level(logging.WARNING, logger="trainer.lineage"):
        assert warn_double_lora(tmp_path, "reward model") is lora
    assert lora_merged_sft(tmp_path) is lora
    assert ("double LoRA" in caplog.text and "Fig. 26" in caplog.text) is lora
    assert lora_merged_sft(tmp_path / "nowhere") is False  # any other model: no lineage, no warning


def test_adamw_8bit_is_refused_off_cuda():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="CUDA only"):
        make_optimizer(p, TrainSection(optimizer="adamw_8bit"), torch.device("cpu"))
    assert isinstance(make_optimizer(p, TrainSection(), torch.device("cpu")), torch.optim.AdamW)
