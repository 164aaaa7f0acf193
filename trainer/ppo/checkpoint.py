"""Checkpoints of a PPO run: everything needed to continue as if never stopped.

RUN/checkpoints/step-{k:06d}/
    adapter/                 LoRA weights (safetensors) + adapter_config.json
    value_head.safetensors
    optimizer.pt             AdamW state (tensors only: loads with weights_only=True)
    rng.pt                   torch RNG + the learner's minibatch-shuffle generator
    state.json               step, data position, KL controller, CRS normaliser moments
RUN/checkpoints/latest       name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write
never leaves a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def save_learner_state(learner, path: Path, trainer_state: dict) -> str:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.model.save_pretrained(str(tmp / "adapter"), safe_serialization=True, save_embedding_layers=False)
    save_file({k: v.detach().cpu().contiguous() for k, v in learner.value_head.state_dict().items()}, tmp / "value_head.safetensors")
    torch.save(learner.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "shuffle": learner.generator.get_state()}, tmp / "rng.pt")
    state = {**trainer_state, "kl_controller": learner.kl_ctl.state_dict(), "crs": learner.crs.state_dict()}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    (path.parent / "latest").write_text(path.name)
    return str(path)


def load_learner_state(learner, path: Path) -> dict:
    from peft import set_peft_model_state_dict

    adapter = load_file(path / "adapter" / "adapter_model.safetensors", device=str(learner.device))
    result = set_peft_model_state_dict(learner.model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint {path}: adapter keys do not match the model: {result.unexpected_keys[:3]}")
    learner.value_head.load_state_dict(load_file(path / "value_head.safetensors", device=str(learner.device)))
    learner.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=learner.device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    learner.generator.set_state(rng["shuffle"])
    state = json.loads((path / "state.json").read_text())
    learner.kl_ctl.load_state_dict(state["kl_controller"])
    learner.crs.load_state_dict(state["crs"])
    return state
