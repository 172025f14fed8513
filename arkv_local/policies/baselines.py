"""Baselines on the same machinery: H2O, StreamingLLM's window, and uniform 4-bit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import KVView, Policy
from .heavy_hitter import HeavyHitter


def recency(view: KVView, layer: int) -> np.ndarray:
    """Newer tokens score higher."""
    return view.layers[layer].pos.astype(np.float64)


@dataclass
class H2O(HeavyHitter):
    """H2O: heavy hitters and the window in f16, everything else evicted (no 4-bit state)."""

    quantize: ClassVar[bool] = False
    name: ClassVar[str] = "h2o"


@dataclass
class Window(Policy):
    """StreamingLLM: attention sinks and the most recent tokens in f16, the rest evicted."""

    quantize: ClassVar[bool] = False
    name: ClassVar[str] = "window"

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        return recency(view, layer)


@dataclass
class Quant(Policy):
    """Uniform 4-bit: every token but the window in Q (the oldest evicted once the budget is
    full), like llama.cpp's quantized cache with an f16 window."""

    name: ClassVar[str] = "quant"

    def ratios(self, view: KVView) -> np.ndarray:
        return np.zeros(len(view.layers))

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        return recency(view, layer)
