"""SFT: the label mask covers assistant tokens only; a short run lowers the loss."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from services.common.chat import format_conversation
from trainer.sft import SFTConfig, train_sft
from trainer.sft.train import IGNORE, assistant_spans, encode_thread

THREAD = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Sure! The capital of France is Paris."},
    {"role": "user", "content": "Why is that?"},
    {"role": "assistant", "content": "Paris has been the capital for centuries."},
]


def test_assistant_spans_point_at_the_replies():
    text = format_conversation(THREAD)
    assert [text[s:e] for s, e in assistant_spans(THREAD)] == [
        "Sure! The capital of France is Paris.<|im_end|>", "Paris has been the capital for centuries.<|im_end|>"]


def test_label_mask_is_assistant_tokens_only(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    ex = encode_thread(tok, THREAD, max_tokens=2048)
    assert len(ex.ids) == len(ex.labels)
    assert tok.decode(ex.ids) == format_conversation(THREAD)
    labelled = [i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.ids, ex.labels))
    assert tok.decode(labelled) == (
        "Sure! The capital of France is Paris.<|im_end|>Paris has been the capital for centuries.<|im_end|>")
    unlabelled = tok.decode([i for i, lab in zip(ex.ids, ex.labels) if lab == IGNORE])
    assert "What is the capital" in unlabelled and "Why is that?" in unlabelled and "Paris" not in unlabelled
    assert len(encode_thread(tok, THREAD, max_tokens=10).ids) == 10


@pytest.mark.slow
def test_short_sft_run_lowers_loss_and_writes_a_causal_lm(tiny_models, tmp_path):
    cfg = SFTConfig(model={"base": str(tiny_models["policy"]), "max_tokens": 512},  # defaults: full fine-tuning
                    train={"epochs": 3}, output_dir=str(tmp_path / "sft"))
    out = train_sft(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_loss"] < m["initial_eval_loss"] - 1.0
    assert m["train_loss_history"][-1] < m["train_loss_history"][0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
def test_lora_sft_adapter_output(tiny_models, tmp_path):
    cfg = SFTConfig(model={"base": str(tiny_models["policy"]), "lora": True, "merge": False, "max_tokens": 256},
                    train={"max_steps": 2}, output_dir=str(tmp_path / "lora"))
    out = train_sft(cfg)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None
