"""Foundation: tiny models, ChatML formatting, the CLI, shared HTTP contracts."""

from __future__ import annotations

import hashlib

import pytest

from services.common.chat import format_conversation, format_pair, format_prompt, split_conversation
from services.common.protocol import ScoreRequest


def test_chatml_matches_mission_template():
    prompt, response = format_pair("What is 2+2?", "4")
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "4<|im_end|>"
    msgs = [{"role": "prompter", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert format_conversation(msgs) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\nd<|im_end|>"
    )
    with pytest.raises(ValueError):
        split_conversation(msgs[:-1])


def test_tokenizer_chat_template_agrees_with_formatter(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    msgs = [{"role": "user", "content": "Hallo, ¿qué tal? 你好"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == format_prompt(msgs)
    full = msgs + [{"role": "assistant", "content": "Bien."}]
    assert tok.apply_chat_template(full, tokenize=False) == format_conversation(full)
    text = format_conversation(full)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


def test_tiny_models_are_deterministic_and_shaped_for_vllm(tmp_path, tiny_models):
    from transformers import AutoConfig

    from crs_rlhf.tiny_models import make_tiny_models

    again = make_tiny_models(tmp_path / "again", seed=0)
    for name in ("policy", "reward_pref", "reward_abs"):
        a = hashlib.sha256((tiny_models[name] / "model.safetensors").read_bytes()).hexdigest()
        b = hashlib.sha256((again[name] / "model.safetensors").read_bytes()).hexdigest()
        assert a == b, name
    cfg = AutoConfig.from_pretrained(tiny_models["policy"])
    assert cfg.head_dim >= 64 and cfg.model_type == "llama"
    rm = AutoConfig.from_pretrained(tiny_models["reward_pref"])
    assert rm.num_labels == 1


def test_score_request_contract_rejects_bad_items():
    ok = ScoreRequest.model_validate({"items": [{"prompt": "p", "response": "r"},
                                                {"messages": [{"role": "user", "content": "u"},
                                                              {"role": "assistant", "content": "a"}]}]})
    assert len(ok.items) == 2
    for bad in ({"items": []}, {"items": [{"prompt": "", "response": "r"}]},
                {"items": [{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "x"}]}]},
                {"items": [{"prompt": "p", "respnse": "r"}]}):
        with pytest.raises(Exception):
            ScoreRequest.model_validate(bad)


def test_cli_lists_commands(capsys):
    from crs_rlhf.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "make-tiny-models", "serve", "train-rm", "train-sft", "train", "plot"):
        assert name in out
    assert main(["no-such-command"]) == 2


@pytest.mark.parametrize("argv", [["services.reward_abs"], ["services.policy_gen", "--model-path", "x", "--backend", "tgi"]])
def test_a_bad_setting_is_a_usage_error_not_a_traceback(argv):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CRS_")}
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert ("--model-path (or CRS_MODEL_PATH)" if len(argv) == 1 else "--backend (or CRS_BACKEND)") in proc.stderr
