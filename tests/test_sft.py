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
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from trainer.modeling import merge_adapter

    peft_model = AutoPeftModelForCausalLM.from_pretrained(out)
    # The merge a k-bit (QLoRA) run does at the end: the adapter onto the unquantized base, on CPU.
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(out, tmp_path / "merged", dtype=torch.float32))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_instruction_files_in_three_formats(tmp_path):
    from trainer.sft.instructions import load_instructions

    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                  {"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
                                 "category": "summarization"}) + "\n")
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    assert load_instructions(alpaca) == [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]
    assert load_instructions(dolly)[0][0]["content"] == "Summarise.\n\nA long text."
    assert load_instructions(gsm)[0][1]["content"] == "2 + 2 = 4\n#### 4"
    assert len(load_instructions(alpaca, max_examples=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(ValueError, match="Alpaca"):
        load_instructions(bad)
    with pytest.raises(FileNotFoundError, match="pre_sft.paths"):
        load_instructions(tmp_path / "missing.json")


@pytest.mark.slow
def test_pre_sft_stage_runs_first(tiny_models, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in
                                ("apple", "river", "stone", "cloud")]))
    cfg = SFTConfig(model={"base": str(tiny_models["policy"]), "max_tokens": 256},
                    pre_sft={"paths": [str(data)], "max_steps": 2}, train={"max_steps": 2},
                    output_dir=str(tmp_path / "sft"))
    m = json.loads((train_sft(cfg) / "metrics.json").read_text())
    assert (m["pre_sft_examples"], m["pre_sft_steps"], m["steps"]) == (4, 2, 2)
    assert m["eval_loss_after_pre_sft"] != m["initial_eval_loss"]  # the first stage changed the model
    assert "best_ranked threads" in m["data"]
    assert (tmp_path / "sft" / "checkpoint-pre-sft" / "checkpoint.pt").exists()
