"""The real-model path's small pieces, without the 135M model: GGUF import refusals on crafted
files, the chat-template check, the stage clock and the learning measure."""

from __future__ import annotations

import numpy as np
import pytest

from crs_rlhf.import_gguf import GGUFImportError, find_gguf, import_gguf, main
from crs_rlhf.real_model import StageClock, learning_measure, merged
from services.common.chat import CHATML_JINJA, format_prompt, template_mismatch

gguf = pytest.importorskip("gguf", reason="the real extra is not installed: pip install 'crs-rlhf[real]'")

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's own template, as its GGUF ships it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _write_gguf(path, arch: str, qtype=None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("crafted")
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw bytes of one block-quantized row
        _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((1, nbytes), dtype=np.uint8), raw_shape=(1, nbytes), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(GGUFImportError, match="no such file"):
        find_gguf(tmp_path / "absent.gguf")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(GGUFImportError, match="not a .gguf file"):
        find_gguf(tmp_path / "model.bin")
    with pytest.raises(GGUFImportError, match="neither a .gguf file nor an installed package"):
        find_gguf("no-such-package-crs")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFImportError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "out")


def test_unsupported_architecture_and_quant_are_refused(tmp_path, capsys):
    _write_gguf(tmp_path / "bert.gguf", "bert")
    assert main([str(tmp_path / "bert.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "architecture 'bert' is not supported" in err and "llama" in err
    _write_gguf(tmp_path / "iq.gguf", "llama", gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(GGUFImportError, match="quant type.*IQ2_XXS.*not supported"):
        import_gguf(tmp_path / "iq.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on a refusal


def test_template_mismatch_names_smollm2s_default_system_prompt(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert tok.chat_template == CHATML_JINJA and template_mismatch(tok) is None
    tok.chat_template = SMOLLM2_TEMPLATE
    why = template_mismatch(tok)
    assert why is not None and "You are a helpful AI assistant named SmolLM" in why
    tok.chat_template = None  # no template: policy_gen falls back to our ChatML
    assert template_mismatch(tok) is None


def test_trainer_tokenizer_replaces_a_mismatching_template(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from trainer.modeling import load_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tok.chat_template = SMOLLM2_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    msgs = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == format_prompt(msgs)
    loaded.save_pretrained(tmp_path / "saved")  # what SFT / RM training writes next to the weights
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert template_mismatch(again) is None


def test_learning_measure_hand_worked():
    rows = [{"reward/crs": v} for v in (0.0, 0.2, 0.1, 0.3, 0.5, 0.4, 0.6, 1.0)]
    m = learning_measure(rows)  # quarters of 2 steps: (0.0 + 0.2) / 2 = 0.1 and (0.6 + 1.0) / 2 = 0.8
    assert m["quarter_steps"] == 2
    assert m["crs_first_quarter"] == pytest.approx(0.1) and m["crs_last_quarter"] == pytest.approx(0.8)
    assert m["crs_gain"] == pytest.approx(0.7)
    assert learning_measure([])["crs_gain"] is None


def test_merged_overrides_recursively_without_touching_inputs():
    a = {"model": {"base": "x", "lora": False}, "train": {"seed": 1}}
    b = {"model": {"lora": True}, "train": {"lr": 0.1}}
    assert merged(a, b) == {"model": {"base": "x", "lora": True}, "train": {"seed": 1, "lr": 0.1}}
    assert a["model"]["lora"] is False and "lr" not in a["train"]


def test_stage_clock_records_each_stage(tmp_path):
    import json
    import time

    clock = StageClock(interval_s=0.05)
    clock.start("one")
    blob = bytearray(64 << 20)  # noqa: F841 -- held so the sampler sees it
    t_end = time.process_time() + 0.3
    while time.process_time() < t_end:  # 0.3 s of CPU in stage one
        pass
    clock.start("two")
    clock.close()
    assert [s["stage"] for s in clock.stages] == ["one", "two"]
    assert all(s["peak_rss_bytes"] > 64 << 20 and s["wall_s"] >= 0 for s in clock.stages)
    assert clock.stages[0]["cpu_s"] >= 0.2
    clock.write(tmp_path / "stages.json", verdict="v")
    data = json.loads((tmp_path / "stages.json").read_text())
    assert data["verdict"] == "v" and data["peak_rss_bytes"] == max(s["peak_rss_bytes"] for s in clock.stages)
    assert "total" in clock.table()
