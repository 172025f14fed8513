"""The planner: from a policy's ratios and scores to a tri-state layout under a byte budget.

A pure function of numpy arrays, the same for every policy: it protects the window and the
sinks, ranks the other tokens of each (layer, KV head), keeps the top ones in O, moves the
next ones to Q as far as the bytes go, spills the next ones to S (host memory) as far as the
spill holds, and evicts the rest, leaving room for new tokens.
"""

from __future__ import annotations

import numpy as np

from .types import POOL_O, POOL_Q, POOL_S, Budget, LayerPlan, LayerView


def plan_layer(lv: LayerView, score: np.ndarray, ratio: float, budget: Budget, room: int,
               pos_max: int, *, window: int, sinks: int, quantize: bool, cap_s: int = 0,
               layer: int = 0) -> LayerPlan:
    """One layer's plan. `score` ranks every row (O, then Q, then S, as `lv.pos`). `ratio` of
    the bytes beyond the window, sinks and room buys O slots (all of them when not `quantize`),
    Q takes what the O pool leaves. Spilled rows come back into Q, or into O for a policy
    without Q; they stay in their S slots otherwise, so that a plan moves only what changes."""
    n_o, n_q, n_s = lv.n_rows
    n_head = lv.pos_o.shape[1]
    pos = lv.pos
    recent = (pos > pos_max - window) | (pos < sinks)
    # the window and sinks stay in O. After a cut of the tail (Tailor.cut) the new window's older
    # rows may be in Q, spilled or evicted in some heads: such a head fills the protected slots
    # it cannot use with its best other rows, its window rows ranked first
    protected = recent[:n_o]
    n_fixed = int(protected.sum(0).max(initial=0))
    free = budget.layer_bytes - (n_fixed + room) * budget.slot_o
    if free < 0:
        raise ValueError(
            f"layer {layer}: a budget of {budget.layer_bytes} bytes cannot hold the window "
            f"and sinks ({n_fixed} tokens) plus room for {room} new tokens in f16")
    n_cand = n_o - n_fixed + n_q + n_s
    n_o_cand = n_o - n_fixed + (0 if quantize else n_s)  # rows that may take an O slot
    o_budget = int(ratio * free) // budget.slot_o if quantize else free // budget.slot_o
    n_o_keep = min(o_budget, n_o_cand)
    cap_o = n_fixed + n_o_keep + room
    n_q_keep = min(budget.cap_q(cap_o) if quantize else 0, n_cand - n_o_keep)
    n_s_keep = min(cap_s, n_cand - n_o_keep - n_q_keep)

    pool = np.repeat([POOL_O, POOL_Q, POOL_S], [n_o, n_q, n_s])
    slot = np.concatenate([np.arange(n_o), np.arange(n_q), np.arange(n_s)])
    rank = np.where(recent, np.inf, score)
    o_src = np.empty((n_fixed + n_o_keep, n_head), np.int32)
    o_from = np.empty_like(o_src, np.uint8)
    q_src = np.empty((n_q_keep, n_head), np.int32)
    q_from = np.empty_like(q_src, np.uint8)
    s_src = np.empty((n_s_keep, n_head), np.int32)
    s_from = np.empty_like(s_src, np.uint8)
    for h in range(n_head):
        fixed = np.flatnonzero(protected[:, h])
        cand = np.setdiff1d(np.arange(len(pos)), fixed, assume_unique=True)
        # ranked together, highest score first, ties to the newer token
        cand = cand[np.lexsort((-pos[cand, h], -rank[cand, h]))]
        may_o = pool[cand] != POOL_Q if not quantize else pool[cand] == POOL_O
        keep_o = cand[may_o][: n_fixed - len(fixed) + n_o_keep]
        rest = cand[~np.isin(cand, keep_o)]
        to_q, to_s = rest[:n_q_keep], rest[n_q_keep : n_q_keep + n_s_keep]
        o_rows = np.concatenate([fixed, keep_o])
        o_src[:, h], o_from[:, h] = _in_place(o_rows, pos[:, h], pool, slot, POOL_O)
        q_src[:, h], q_from[:, h] = _in_place(to_q, pos[:, h], pool, slot, POOL_Q)
        s_src[:, h], s_from[:, h] = _in_place(to_s, pos[:, h], pool, slot, POOL_S)
    return LayerPlan(cap_o, o_src, q_src, q_from, s_src, s_from, o_from)


def _in_place(rows: np.ndarray, pos: np.ndarray, pool: np.ndarray, slot: np.ndarray,
              home: int) -> tuple[np.ndarray, np.ndarray]:
    """The sources of the len(rows) slots of pool `home`: a row already there keeps its slot
    (its bytes are not moved; attention does not depend on the order of rows), the others fill
    the free slots in position order. A plan then moves only the rows that change place."""
    n = len(rows)
    stays = (pool[rows] == home) & (slot[rows] < n)
    dst = np.full(n, -1)
    dst[slot[rows[stays]]] = rows[stays]
    moved = rows[~stays]
    dst[dst < 0] = moved[np.argsort(pos[moved], kind="stable")]
    return slot[dst], pool[dst]


def drop_rows(lv: LayerView, score: np.ndarray, cap_o: int, drop: tuple[int, int],
              pos_max: int, *, window: int, sinks: int) -> LayerPlan:
    """One layer's plan for a context shift: the rows at positions in `drop` = [p0, p1) leave,
    every other row stays in its pool (and a spilled one in its slot). Where the KV heads would
    keep different numbers of rows in a pool (they must hold equal counts), each keeps that
    pool's smallest number: its window and sinks, then its highest-scored rows."""
    n_o, n_q, n_s = lv.n_rows
    n_head = lv.pos_o.shape[1]
    pos = lv.pos
    pool = np.repeat([POOL_O, POOL_Q, POOL_S], [n_o, n_q, n_s])
    slot = np.concatenate([np.arange(n_o), np.arange(n_q), np.arange(n_s)])
    keep = (pos < drop[0]) | (pos >= drop[1])
    rank = np.where((pos > pos_max - window) | (pos < sinks), np.inf, score)
    srcs = []
    for p in (POOL_O, POOL_Q, POOL_S):
        in_pool = keep & (pool == p)[:, None]
        k = int(in_pool.sum(0).min())
        src = np.empty((k, n_head), np.int32)
        for h in range(n_head):
            rows = np.flatnonzero(in_pool[:, h])
            rows = rows[np.lexsort((-pos[rows, h], -rank[rows, h]))][:k]  # best first
            src[:, h] = _in_place(rows, pos[:, h], pool, slot, p)[0]
        srcs.append(src)
    o_src, q_src, s_src = srcs
    return LayerPlan(cap_o, o_src, q_src, np.full(q_src.shape, POOL_Q, np.uint8), s_src,
                     np.full(s_src.shape, POOL_S, np.uint8), np.full(o_src.shape, POOL_O, np.uint8))
