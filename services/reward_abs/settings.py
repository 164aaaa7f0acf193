"""Settings of the absolute reward service: the shared reward settings, default port 8002."""

from __future__ import annotations

from pydantic import Field

from services.reward.settings import RewardServiceSettings


class RewardAbsSettings(RewardServiceSettings):
    port: int = Field(8002, ge=0, le=65535)
