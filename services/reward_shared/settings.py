"""Settings of the shared-base reward mode: one base model, two LoRA adapters, two ports.

Every scoring/batching field is the shared reward settings' (so `--max-wait-ms` means the
same as in the single services); `for_kind` turns this into the per-kind settings that the
unchanged reward app factory takes.
"""

from __future__ import annotations

from pydantic import Field

from services.common.protocol import RewardKind
from services.common.reward_settings import RewardServiceSettings

_SHARED_ONLY = {"base_path", "pref_adapter", "abs_adapter", "pref_port", "abs_port", "pref_model_id", "abs_model_id"}


class RewardSharedSettings(RewardServiceSettings):
    model_path: str = Field("", description="Not used in shared mode: give --base-path and the two adapters.")
    base_path: str = Field(description="Sequence-classification base model both adapters were trained on.")
    pref_adapter: str = Field(description="PEFT LoRA adapter folder of the preference reward model.")
    abs_adapter: str = Field(description="PEFT LoRA adapter folder of the absolute reward model.")
    pref_port: int = Field(8001, ge=0, le=65535, description="Port of the preference contract.")
    abs_port: int = Field(8002, ge=0, le=65535, description="Port of the absolute contract.")
    pref_model_id: str | None = Field(None, description="Served id of the preference model; default: adapter folder name.")
    abs_model_id: str | None = Field(None, description="Served id of the absolute model; default: adapter folder name.")

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
