"""Settings of the preference reward service: the shared reward settings, default port 8001."""

from __future__ import annotations

from pydantic import Field

from services.reward.settings import RewardServiceSettings


class RewardPrefSettings(RewardServiceSettings):
    port: int = Field(8001, ge=0, le=65535)
