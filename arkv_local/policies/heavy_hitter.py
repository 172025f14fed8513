"""Heavy-hitter scoring shared by H2O and ARKV: attention mass and its variance per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import KVView, Policy
from .scores import heavy_hitter, smooth_by_position


@dataclass
class HeavyHitter(Policy):
    """Tokens that recent queries attend to most are kept: per (layer, KV head),
    hh = mean + gamma * var of their attention since the last tailoring, averaged over the GQA
    group and smoothed over neighbouring tokens (width 5)."""

    gamma: float = 263.8

    needs_scores: ClassVar[bool] = True

    def scores(self, view: KVView, layer: int) -> tuple[np.ndarray, np.ndarray]:
        lv = view.layers[layer]
        n = view.n_queries * view.group
        hh = np.concatenate([heavy_hitter(lv.mass_o, lv.mass_sq_o, n, self.gamma),
                             heavy_hitter(lv.mass_q, lv.mass_sq_q, n, self.gamma)])
        pos = np.concatenate([lv.pos_o, lv.pos_q])
        for h in range(hh.shape[1]):
            hh[:, h] = smooth_by_position(hh[:, h], pos[:, h])
        return hh[: len(lv.pos_o)], hh[len(lv.pos_o):]
