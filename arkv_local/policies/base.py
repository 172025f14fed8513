"""Policy base class: turns the memory's statistics into a tri-state plan under a byte budget.

A policy says two things: per layer, the share of the non-window budget kept in f16 (`ratios`),
and per cached token, how important it is (`scores`). The base class does the rest the same way
for every policy: it protects the window and the sinks, ranks the other tokens of each
(layer, KV head), keeps the top ones in O, moves the next ones to Q as far as the bytes go, and
evicts the rest, leaving room for the next tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..memory import LayerPlan


@dataclass(frozen=True)
class LayerView:
    """One layer as a policy sees it; arrays are (slots in use, n_head_kv)."""

    pos_o: np.ndarray   # positions in the O slots
    pos_q: np.ndarray   # positions in the Q slots
    mass_o: np.ndarray  # attention mass per slot since the last plan (summed over queries
    mass_sq_o: np.ndarray  # and over the GQA group), and squared mass
    mass_q: np.ndarray
    mass_sq_q: np.ndarray


@dataclass(frozen=True)
class KVView:
    """What the memory holds now, for a policy to decide on."""

    layers: list[LayerView]
    n_queries: int           # queries accumulated since the last plan
    group: int               # query heads per KV head (GQA)
    stats: np.ndarray | None  # (n_layer, 3): entropy, variance, kurtosis of the first prefill
    pos_max: int             # newest position


@dataclass(frozen=True)
class Budget:
    """One layer's bytes and what slots cost; cap_q(cap_o) is the Q room a layout leaves."""

    layer_bytes: int
    slot_o: int
    slot_q: int
    cap_q: Callable[[int], int]


@dataclass
class Policy:
    """Base class of KV policies (see the module docstring).

    window: newest tokens always kept in f16 and never scored; sinks: first tokens always kept
    in f16 (4, as StreamingLLM: without them a policy that evicts old tokens loses the
    attention sink once the budget is full); slack: slots freed for new tokens at each
    tailoring, so that it does not run on every token.
    """

    window: int = 32
    sinks: int = 4
    slack: int = 64

    quantize: ClassVar[bool] = True  # whether the policy uses Q slots at all
    needs_scores: ClassVar[bool] = False  # whether scores() reads the attention statistics
    needs_stats: ClassVar[bool] = False   # whether ratios() reads the prefill statistics
    name: ClassVar[str] = "custom"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.slack < 1:
            raise ValueError(f"slack must be >= 1, got {self.slack}")

    # what a policy decides

    def reset(self) -> None:
        """A new sequence starts: forget what was learnt about the previous one."""

    def ratios(self, view: KVView) -> np.ndarray:
        """Per layer, the share of the non-window budget kept in O, in [0, 1]."""
        return np.ones(len(view.layers))

    def scores(self, view: KVView, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Importance of each O and Q slot in use, shaped as pos_o and pos_q; higher is kept."""
        raise NotImplementedError

    # mechanics shared by all policies

    def min_budget_tokens(self) -> int:
        """The smallest budget (in f16 tokens per layer) a plan fits in: window, sinks, slack."""
        return self.window + self.sinks + self.slack

    def plan(self, view: KVView, budget: Budget, room: int) -> list[LayerPlan]:
        """A plan that leaves at least `room` free O slots in every layer."""
        room = max(room, self.slack)
        ratios = np.clip(np.asarray(self.ratios(view), np.float64), 0.0, 1.0)
        if ratios.shape != (len(view.layers),) or not np.isfinite(ratios).all():
            raise ValueError(f"{self.name}: ratios must be {len(view.layers)} finite numbers")
        plans = []
        for i, lv in enumerate(view.layers):
            score_o, score_q = self.scores(view, i)
            if score_o.shape != lv.pos_o.shape or score_q.shape != lv.pos_q.shape:
                raise ValueError(f"{self.name}: scores of layer {i} must match the slots in use")
            plans.append(self._layer_plan(lv, score_o, score_q, ratios[i], budget, room,
                                          view.pos_max, i))
        return plans

    def _layer_plan(self, lv: LayerView, score_o: np.ndarray, score_q: np.ndarray, ratio: float,
                    budget: Budget, room: int, pos_max: int, layer: int) -> LayerPlan:
        n_o, n_head = lv.pos_o.shape
        protected = (lv.pos_o > pos_max - self.window) | (lv.pos_o < self.sinks)
        n_fixed = int(protected[:, 0].sum())
        if (protected.sum(0) != n_fixed).any():
            raise ValueError(f"layer {layer}: the window and sinks are not in O in every head")
        free = budget.layer_bytes - (n_fixed + room) * budget.slot_o
        if free < 0:
            raise ValueError(
                f"layer {layer}: a budget of {budget.layer_bytes} bytes cannot hold the window "
                f"and sinks ({n_fixed} tokens) plus room for {room} new tokens in f16")
        n_o_cand = n_o - n_fixed
        o_budget = int(ratio * free) // budget.slot_o if self.quantize else free // budget.slot_o
        n_o_keep = min(o_budget, n_o_cand)
        cap_o = n_fixed + n_o_keep + room
        n_q_max = 0
        if self.quantize:
            n_q_max = min(budget.cap_q(cap_o), (free - n_o_keep * budget.slot_o) // budget.slot_q)
        n_q_keep = min(n_q_max, n_o_cand - n_o_keep + len(lv.pos_q))

        o_src = np.empty((n_fixed + n_o_keep, n_head), np.int32)
        q_src = np.empty((n_q_keep, n_head), np.int32)
        q_from_o = np.empty((n_q_keep, n_head), bool)
        for h in range(n_head):
            cand_o = np.flatnonzero(~protected[:, h])
            # O and Q candidates ranked together, highest score first, ties to the newer token
            slot = np.concatenate([cand_o, np.arange(len(lv.pos_q))])
            is_o = np.arange(len(slot)) < len(cand_o)
            pos = np.concatenate([lv.pos_o[cand_o, h], lv.pos_q[:, h]])
            rank = np.lexsort((-pos, -np.concatenate([score_o[cand_o, h], score_q[:, h]])))
            keep_o = rank[is_o[rank]][:n_o_keep]      # only O tokens can stay O
            kept = np.zeros(len(slot), bool)
            kept[keep_o] = True
            to_q = rank[~kept[rank]][:n_q_keep]       # the next ones, from O or Q
            to_q = to_q[np.argsort(pos[to_q])]
            o_slots = np.concatenate([np.flatnonzero(protected[:, h]), slot[keep_o]])
            o_src[:, h] = o_slots[np.argsort(lv.pos_o[o_slots, h])]
            q_src[:, h] = slot[to_q]
            q_from_o[:, h] = is_o[to_q]
        return LayerPlan(cap_o, o_src, q_src, q_from_o)
