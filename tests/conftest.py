"""Shared fixtures: model files (the default model comes from the cache, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

import arkv_local


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct GGUF (Llama architecture), the default model."""
    return arkv_local.default_model_path()
