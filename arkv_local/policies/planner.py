"""The planner: from a policy's ratios and scores to a tri-state layout under a byte budget.

A pure function of numpy arrays, the same for every policy: it protects the window and the
sinks, ranks the other tokens of each (layer, KV head), keeps the top ones in O, moves the
next ones to Q as far as the bytes go, and evicts the rest, leaving room for new tokens.
"""

from __future__ import annotations

import numpy as np

from .types import Budget, LayerPlan, LayerView


def plan_layer(lv: LayerView, score_o: np.ndarray, score_q: np.ndarray, ratio: float,
               budget: Budget, room: int, pos_max: int, *, window: int, sinks: int,
               quantize: bool, layer: int = 0) -> LayerPlan:
    """One layer's plan: `ratio` of the bytes beyond the window, sinks and room buys O slots
    (all of them when not `quantize`), Q takes what the O pool leaves."""
    n_o, n_head = lv.pos_o.shape
    protected = (lv.pos_o > pos_max - window) | (lv.pos_o < sinks)
    n_fixed = int(protected[:, 0].sum())
    if (protected.sum(0) != n_fixed).any():
        raise ValueError(f"layer {layer}: the window and sinks are not in O in every head")
    free = budget.layer_bytes - (n_fixed + room) * budget.slot_o
    if free < 0:
        raise ValueError(
            f"layer {layer}: a budget of {budget.layer_bytes} bytes cannot hold the window "
            f"and sinks ({n_fixed} tokens) plus room for {room} new tokens in f16")
    n_o_cand = n_o - n_fixed
    o_budget = int(ratio * free) // budget.slot_o if quantize else free // budget.slot_o
    n_o_keep = min(o_budget, n_o_cand)
    cap_o = n_fixed + n_o_keep + room
    n_q_max = budget.cap_q(cap_o) if quantize else 0
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
