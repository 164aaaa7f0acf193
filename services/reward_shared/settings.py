"""Settings of the shared-base reward mode: one base model, two LoRA adapters, two ports.

Every scoring/batching field is the shared reward settings' (so `--max-wait-ms` means the
same as in the single services); `for_kind` turns this into the per-kind settings that the
unchanged reward app factory takes.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import CliSuppress

from services.common.protocol import RewardKind
from services.reward.settings import RewardServiceSettings

_SHARED_ONLY = {"base_path", "pref_adapter", "abs_adapter", "pref_port", "abs_port", "pref_model_id", "abs_model_id"}


class RewardSharedSettings(RewardServiceSettings):
    # Inherited fields this mode has no use for: hidden from --help and refused if set, so a
    # user's --port or CRS_MODEL_PATH is never silently ignored.
    model_path: CliSuppress[str] = Field("", description="Not used in shared mode.")
    port: CliSuppress[int] = Field(0, description="Not used in shared mode.")
    model_id: CliSuppress[str | None] = Field(None, description="Not used in shared mode.")
    base_path: str = Field(description="Sequence-classification base model both adapters were trained on.")
    pref_adapter: str = Field(description="PEFT LoRA adapter folder of the preference reward model.")
    abs_adapter: str = Field(description="PEFT LoRA adapter folder of the absolute reward model.")
    pref_port: int = Field(8001, ge=0, le=65535, description="Port of the preference contract.")
    abs_port: int = Field(8002, ge=0, le=65535, description="Port of the absolute contract.")
    pref_model_id: str | None = Field(None, description="Served id of the preference model; default: adapter folder name.")
    abs_model_id: str | None = Field(None, description="Served id of the absolute model; default: adapter folder name.")

    @model_validator(mode="after")
    def _no_single_service_fields(self) -> RewardSharedSettings:
        unused = {"model_path": "--base-path and --pref-adapter/--abs-adapter", "port": "--pref-port/--abs-port",
                  "model_id": "--pref-model-id/--abs-model-id"}
        for name, instead in unused.items():
            if name in self.model_fields_set:
                raise ValueError(f"{name} is not used in shared mode (CRS_{name.upper()}); use {instead}")
        # Packed rows need one merged model per process; here two unmerged adapters take turns
        # on one base (engine.py), so shared mode scores padded batches only.
        if self.packing == "on" or self.compile:
            raise ValueError("--packing on and --compile are not available in shared-base mode (two unmerged "
                             "LoRA adapters on one base score padded batches); use --packing auto/off without "
                             "--compile, or serve each adapter with reward_pref/reward_abs for packed rows")
        return self

    def adapter(self, kind: RewardKind) -> str:
        return self.pref_adapter if kind == "preference" else self.abs_adapter

    def for_kind(self, kind: RewardKind) -> RewardServiceSettings:
        """The settings one kind's app sees: its adapter as model_path, its port and id."""
        pref = kind == "preference"
        common = self.model_dump(exclude=_SHARED_ONLY | {"model_path", "port", "model_id"})
        return RewardServiceSettings(
            **common,
            model_path=self.adapter(kind),
            port=self.pref_port if pref else self.abs_port,
            model_id=self.pref_model_id if pref else self.abs_model_id,
        )
