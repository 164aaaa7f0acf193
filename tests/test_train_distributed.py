"""SFT / reward-model training beyond one device: torchrun data parallelism on CPU (gloo),
precision, gradient checkpointing, and the k-bit settings' validation and errors.

The end-to-end checks launch `torchrun --nproc-per-node 2 -m crs_rlhf.cli ...` exactly as a
user would and compare the written weights with a one-process run of the same global batch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from trainer.rm.config import AbsoluteRMConfig, PreferenceRMConfig
from trainer.sft.config import SFTConfig
from trainer.train_device import (
    GPU_INSTALL,
    DeviceSetupError,
    require_bitsandbytes,
    resolve_device,
    shard_slice,
    shard_weight,
)

TORCHRUN = Path(sys.executable).with_name("torchrun")


# ---- config validation ------------------------------------------------------------------

def test_quantization_needs_lora_and_known_values(tiny_models):
    base = str(tiny_models["policy"])
    with pytest.raises(ValidationError, match="set model.lora: true"):
        SFTConfig(model={"base": base, "lora": False, "quantization": "4bit"})
    with pytest.raises(ValidationError, match="set model.lora: true"):
        PreferenceRMConfig(model={"base": base, "lora": False, "quantization": "8bit"})
    with pytest.raises(ValidationError, match="quantization"):
        AbsoluteRMConfig(model={"base": base, "quantization": "3bit"})
    with pytest.raises(ValidationError, match="precision"):
        SFTConfig(model={"base": base}, train={"precision": "fp16"})
    ok = PreferenceRMConfig(model={"base": base, "quantization": "4bit"},
                            train={"precision": "bf16", "gradient_checkpointing": True})
    assert (ok.model.quantization, ok.train.precision, ok.train.gradient_checkpointing) == ("4bit", "bf16", True)
    defaults = SFTConfig(model={"base": base})
    assert (defaults.model.quantization, defaults.train.precision, defaults.train.gradient_checkpointing) == (
        "none", "auto", False)


def test_kbit_base_errors_say_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU error")
    with pytest.raises(DeviceSetupError, match="needs a CUDA GPU.*model.quantization: none"):
        resolve_device("auto", "4bit")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(DeviceSetupError) as e:  # a GPU machine without the package
        require_bitsandbytes("8bit", torch.device("cuda"))
    assert GPU_INSTALL in str(e.value) and "pip install 'crs-rlhf[gpu]'" in str(e.value)


def test_kbit_run_on_cpu_is_a_clean_cli_error(tiny_models, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU error")
    from crs_rlhf.cli import main

    rc = main(["train-rm", "preference", "--config", "configs/tiny/rm_preference.yaml", "--output-dir", str(tmp_path),
               "--set", f"model.base={tiny_models['policy']}", "--set", "model.quantization=4bit"])
    assert rc == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_precision_resolution_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU resolution")
    auto = resolve_device("auto")
    assert (auto.device.type, auto.storage_dtype, auto.compute_dtype) == ("cpu", torch.float32, None)
    lora = resolve_device("bf16")
    assert (lora.storage_dtype, lora.compute_dtype) == (torch.bfloat16, torch.bfloat16)
    full = resolve_device("bf16", trains_base=True)  # every weight trains: fp32 master weights
    assert (full.storage_dtype, full.compute_dtype) == (torch.float32, torch.bfloat16)


# ---- shard weighting (pure) ---------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
def test_weighted_shard_means_average_to_the_batch_mean(world):
    rng = random.Random(world)
    for _ in range(50):
        n = rng.randint(1, 7)  # a short last batch may leave ranks empty
        items = [[rng.random() for _ in range(rng.randint(0, 6))] for _ in range(n)]  # terms per item
        shards = [items[shard_slice(n, r, world)] for r in range(world)]
        assert [x for s in shards for x in s] == items  # contiguous, complete, disjoint
        total = sum(len(i) for i in items)
        if total == 0:
            continue
        mean = sum(x for i in items for x in i) / total
        ranks = []
        for s in shards:
            units = sum(len(i) for i in s)
            w = shard_weight(units, total, world)
            ranks.append(w * (sum(x for i in s for x in i) / units) if units else 0.0)
        assert sum(ranks) / world == pytest.approx(mean, abs=1e-12)


# ---- precision and checkpointing on the tiny models ----------------------------------------

def test_bf16_keeps_trained_tensors_and_losses_in_fp32(tiny_models):
    from transformers import AutoTokenizer

    from trainer.rm.modeling import load_reward_model, reward_scores
    from trainer.sft.train import IGNORE, token_loss

    td = resolve_device("bf16")
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    model = load_reward_model(str(tiny_models["policy"]), tok, td, {"r": 4, "alpha": 8, "dropout": 0.0},
                              gradient_checkpointing=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with td.autocast():
        z = reward_scores(model, ids, mask)  # (2,)
    assert z.dtype == torch.float32
    z.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    logits = torch.randn(2, 4, 11, dtype=torch.bfloat16)
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE], [IGNORE, IGNORE, 2, 1]])
    assert token_loss(logits, labels).dtype == torch.float32


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tiny_models):
    from transformers import AutoModelForCausalLM

    from trainer.modeling import wrap_lora
    from trainer.train_device import prepare_base

    td = resolve_device("fp32")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = prepare_base(AutoModelForCausalLM.from_pretrained(tiny_models["policy"]), td, ckpt)
        model = wrap_lora(model, 4, 8, 0.0, task="CAUSAL_LM")
        assert model.base_model.model.is_gradient_checkpointing == ckpt
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


# ---- torchrun: 2 processes (gloo) == 1 process --------------------------------------------

def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "crs_rlhf.cli", *args]
    proc = subprocess.run(cmd, check=False, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


@pytest.mark.slow
def test_sft_two_ranks_match_one(tiny_models, tmp_path):
    """LoRA + gradient checkpointing on 2 ranks vs plain LoRA on one: the same weights.
    Batches of 3 threads over 2 ranks: shards of 2 and 1 threads with unequal token counts."""
    from trainer.sft import train_sft

    overrides = {"model": {"base": str(tiny_models["policy"]), "lora": True, "max_tokens": 128},
                 "train": {"max_steps": 3, "batch_size": 3, "grad_accum": 2, "lr": 1e-2}}
    one = train_sft(SFTConfig(**overrides, output_dir=str(tmp_path / "one")))
    proc = _torchrun(["train-sft", "--config", "configs/tiny/sft.yaml", "--output-dir", str(tmp_path / "two"),
                      "--set", f"model.base={tiny_models['policy']}", "--set", "model.lora=true",
                      "--set", "model.max_tokens=128", "--set", "train.max_steps=3", "--set", "train.batch_size=3",
                      "--set", "train.grad_accum=2", "--set", "train.lr=0.01",
                      "--set", "train.gradient_checkpointing=true"], tmp_path)
    assert proc.stdout.count("model written to") == 1  # rank 0 alone reports
    assert _max_weight_diff(one, tmp_path / "two") < 1e-5
    h1 = json.loads((one / "metrics.json").read_text())["train_loss_history"]
    h2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["train_loss_history"]
    assert h2 == pytest.approx(h1, abs=1e-5) and len(h1) == 3
    assert _max_weight_diff(one, tiny_models["policy"]) > 1e-3  # it trained at all


@pytest.mark.slow
def test_preference_rm_two_ranks_match_one(tiny_models, tmp_path):
    """Per-pair averaging over ranked sets of 2-4 replies: shards hold whole sets with unequal
    pair counts, so only pair-count weighting gives the one-device gradient."""
    from trainer.rm import train_preference_rm

    sets = {"model": {"base": str(tiny_models["policy"]), "max_tokens": 128, "min_prompt_tokens": 32},
            "loss": {"average": "pair"}, "train": {"max_steps": 3, "batch_size": 5, "lr": 1e-2}}
    one = train_preference_rm(PreferenceRMConfig(**sets, output_dir=str(tmp_path / "one")))
    _torchrun(["train-rm", "preference", "--config", "configs/tiny/rm_preference.yaml",
               "--output-dir", str(tmp_path / "two"), "--set", f"model.base={tiny_models['policy']}",
               "--set", "model.max_tokens=128", "--set", "model.min_prompt_tokens=32", "--set", "loss.average=pair",
               "--set", "train.max_steps=3", "--set", "train.batch_size=5", "--set", "train.lr=0.01"], tmp_path)
    assert _max_weight_diff(one, tmp_path / "two") < 1e-5
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, tmp_path / "two"))
    assert m2["train_loss_history"] == pytest.approx(m1["train_loss_history"], abs=1e-5)
    assert m2["eval_pairwise_accuracy"] == m1["eval_pairwise_accuracy"]
