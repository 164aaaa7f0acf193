"""The absolute reward service's app: the shared reward app with kind 'absolute'."""

from __future__ import annotations

from fastapi import FastAPI

from services.reward.app import build_app
from services.reward_abs.settings import RewardAbsSettings

KIND = "absolute"


def create_app(settings: RewardAbsSettings) -> FastAPI:
    return build_app(settings, KIND)
