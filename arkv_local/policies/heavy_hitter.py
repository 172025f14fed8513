"""Heavy-hitter scoring shared by H2O and ARKV: attention mass and its variance per token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .base import KVView, Policy, is_real
from .scores import heavy_hitter, smooth_by_position
from .types import array_from_data, array_to_data

# weight of the attention's variance in the heavy-hitter score, for ARKV and H2O alike: the
# reference's instruct value (its tuned 263.8 makes the variance drown the mean)
GAMMA = 0.8


@dataclass
class HeavyHitter(Policy):
    """Tokens that recent queries attend to most are kept: per (layer, KV head),
    hh = mean + gamma * var of their attention since the last tailoring, averaged over the GQA
    group and smoothed over neighbouring tokens (width 5). With ema > 0 a token's score is
    ema * its previous score + (1 - ema) * hh: it remembers earlier tailorings' queries."""

    gamma: float = GAMMA
    ema: float = 0.0

    needs_scores: ClassVar[bool] = True

    _past: list[np.ndarray] = field(default_factory=list, init=False, repr=False, compare=False)
    # what _remember changed since the last planned(): (layer, its array before, the flat
    # indices written, their values before), to take back a plan that was not applied
    _undo: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not is_real(self.gamma) or not 0.0 <= self.gamma < np.inf:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")

    def reset(self) -> None:
        self._past, self._undo = [], []

    def planned(self, applied: bool) -> None:
        for layer, before, idx, prev in ([] if applied else reversed(self._undo)):
            self._past[layer].reshape(-1)[idx] = prev  # the array grown since, or this one
            self._past[layer] = before
        self._undo = []

    def prepare(self, view: KVView) -> None:
        if self.ema > 0.0 and view.layers:  # then each layer's scoring grows its own memory
            self._memories(len(view.layers), view.layers[0].pos_o.shape[1])

    def _memories(self, n_layer: int, n_head_kv: int) -> None:
        """A memory (empty until scored) for each of n_layer layers."""
        self._past += [np.full((0, n_head_kv), np.nan, np.float32)
                       for _ in range(n_layer - len(self._past))]

    def snapshot(self) -> dict[str, Any]:
        return {"past": [array_to_data(p) for p in self._past]}

    def restore(self, data: dict[str, Any]) -> None:
        past = [array_from_data(p) for p in data.get("past", [])]
        if any(p.ndim != 2 for p in past):
            raise ValueError("a heavy-hitter memory is one (position, KV head) array per layer")
        self._past, self._undo = past, []

    def shift(self, n_keep: int, n_discard: int) -> None:
        for p in self._past:  # in place: the memory keeps its size
            end = max(len(p) - n_discard, n_keep)
            p[n_keep:end] = p[n_keep + n_discard:]
            p[end:] = np.nan
        self._undo = []

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        lv = view.layers[layer]
        hh = heavy_hitter(lv.mass, lv.mass_sq, view.n_queries * view.group, self.gamma)
        pos = lv.pos
        hh = smooth_by_position(hh, pos)
        if self.ema > 0.0:
            hh = self._remember(layer, pos, hh, view.n_positions)
        return hh

    def _remember(self, layer: int, pos: np.ndarray, hh: np.ndarray,
                  n_positions: int) -> np.ndarray:
        """Blend with the scores of the last tailoring, by position (NaN: not scored yet). The
        memory is made for the whole window at once, so that it does not grow as a chat goes."""
        if layer >= len(self._past):  # scored alone (a plan's prepare() made them all)
            self._memories(layer + 1, hh.shape[1])
        past = before = self._past[layer]
        if not past.flags.c_contiguous:  # written through a flat view below
            past = np.ascontiguousarray(past)
        need = int(pos.max(initial=-1)) + 1
        if need > len(past):
            size = max(need, n_positions) if n_positions else max(need, 2 * len(past))
            past = np.concatenate([past, np.full((size - len(past), hh.shape[1]), np.nan,
                                                 np.float32)])
        idx = pos.astype(np.intp)  # (position, head) as a flat index into the C-ordered memory
        idx *= hh.shape[1]
        idx += np.arange(hh.shape[1])
        flat = past.reshape(-1)
        prev = flat.take(idx)
        self._undo.append((layer, before, idx, prev))
        out = np.where(np.isnan(prev), hh, self.ema * prev + (1.0 - self.ema) * hh)
        flat[idx] = out
        self._past[layer] = past
        return out
