"""Shared fixtures: model files (the default model comes from the cache, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

import arkv_local


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct GGUF (Llama architecture), the default model."""
    return arkv_local.default_model_path()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the token lists llama.cpp decodes during the test (every read, re-reads
    inside arkv_local's eval included), counted at llama_cpp.Llama.eval."""
    import llama_cpp

    lengths: list[int] = []
    stock = llama_cpp.Llama.eval

    def counted(self: llama_cpp.Llama, tokens: list[int]) -> None:
        lengths.append(len(tokens))
        stock(self, tokens)

    monkeypatch.setattr(llama_cpp.Llama, "eval", counted)
    return lengths
