"""The preference reward service's app: the shared reward app with kind 'preference'."""

from __future__ import annotations

from fastapi import FastAPI

from services.reward.app import build_app
from services.reward_pref.settings import RewardPrefSettings

KIND = "preference"


def create_app(settings: RewardPrefSettings) -> FastAPI:
    return build_app(settings, KIND)
