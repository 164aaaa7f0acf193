"""Session fixtures shared by every test: tiny models built once, locally, no download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite may reach a hub; fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{'policy': Path, 'reward_pref': Path, 'reward_abs': Path} built by make-tiny-models."""
    from crs_rlhf.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)
