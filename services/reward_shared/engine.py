"""One base model, two LoRA adapters: per-adapter engines that share the loaded weights.

The base loads ONCE; both adapters are attached to it with PEFT (unmerged, so they can be
switched). Each `AdapterEngine` is a plain `RewardEngine` (same encoding, padding, last-real-
token pooling, fp32 head) whose only difference is model selection: under one lock it makes
its adapter active, then scores. The two services' batchers have a worker thread each, so the
lock is what keeps a forward of one adapter from running while the other is switched in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from services.reward.engine import EngineOptions, RewardEngine, packing_wanted, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


class SharedModel:
    """The PEFT-wrapped base and the lock that serialises adapter switch + forward."""

    def __init__(self, peft_model):
        self.peft = peft_model
        self.lock = threading.Lock()
        self.active: str | None = None

    def activate(self, name: str) -> None:
        """Caller holds `lock`. Switching walks every module, so it is skipped when already active."""
        if self.active != name:
            self.peft.set_adapter(name)
            self.active = name


def _adapter_head(hf_model: nn.Module, name: str) -> nn.Module:
    """The score head `name` uses: its own modules_to_save copy, else the base head."""
    from peft.utils.other import ModulesToSaveWrapper

    head = hf_model.score
    if isinstance(head, ModulesToSaveWrapper):
        # nn.ModuleDict has no .get()
        return head.modules_to_save[name] if name in head.modules_to_save else head.original_module  # noqa: SIM401
    return head


class AdapterEngine(RewardEngine):
    """A RewardEngine over the shared model that activates its adapter before each forward."""

    def __init__(self, shared: SharedModel, name: str, tokenizer, opts: EngineOptions, device):
        # The HF model inside PEFT carries the injected LoRA layers: `.base_model` is its
        # backbone, as the single-model engine expects; the head is resolved per adapter.
        hf_model = shared.peft.base_model.model
        super().__init__(hf_model, tokenizer, opts, device)
        self.shared = shared
        self.adapter = name
        head = _adapter_head(hf_model, name)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"adapter {name!r}: expected a linear `score` head, found {type(head).__name__}")  # noqa: TRY004 -- a setup error, not a caller's type
        self._head = head

    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        with self.shared.lock:
            self.shared.activate(self.adapter)
            return super().score_ids(rows)


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # "preference" / "absolute": the PEFT adapter name
    path: str  # adapter folder
    opts: EngineOptions  # its service's options (model_path = the adapter folder)


def _check_adapter(path: Path, base_path: str) -> None:
    if not (path / "adapter_config.json").exists():
        raise ValueError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").exists():
        raise ValueError(f"{path} has no adapter_model.safetensors: only safetensors weights are loaded")
    from peft import PeftConfig

    trained_on = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if trained_on and Path(trained_on).resolve() != Path(base_path).resolve():
        log.warning("adapter %s names base %s, serving it on %s", path, trained_on, base_path)


def load_shared_engines(base_path: str, specs: Sequence[AdapterSpec]) -> dict[str, AdapterEngine]:
    """Load `base_path` once, attach every adapter, return one engine per adapter name."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    first = specs[0].opts
    device = resolve_device(first.device)
    dtype = resolve_dtype(first.dtype, device)
    if packing_wanted(first.packing, device):  # auto on CUDA; settings refuse "on"
        log.info("packing is off in shared-base mode (two unmerged adapters score padded batches); "
                 "serve each adapter with reward_pref/reward_abs for packed rows")
    for spec in specs:
        _check_adapter(Path(spec.path), base_path)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=first.trust_remote_code
    )
    peft_model = PeftModel.from_pretrained(base, specs[0].path, adapter_name=specs[0].name)
    for spec in specs[1:]:
        peft_model.load_adapter(spec.path, adapter_name=spec.name)
    shared = SharedModel(peft_model)
    engines = {}
    for spec in specs:
        path = Path(spec.path)
        tok_path = str(path) if (path / "tokenizer_config.json").exists() else base_path
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=first.trust_remote_code)
        engines[spec.name] = AdapterEngine(shared, spec.name, tokenizer, spec.opts, device)
    return engines
