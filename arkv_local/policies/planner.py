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
    pos = np.ascontiguousarray(lv.pos.T)  # (head, row): every head at once, its rows contiguous
    recent = (pos > pos_max - window) | (pos < sinks)
    # the window and sinks stay in O. After a cut of the tail (Tailor.cut) the new window's older
    # rows may be in Q, spilled or evicted in some heads: such a head fills the protected slots
    # it cannot use with its best other rows, its window rows ranked first
    protected = recent[:, :n_o]
    n_fixed = int(protected.sum(1).max(initial=0))
    n_o_keep, cap_o, n_q_keep, n_s_keep = slot_counts(lv.n_rows, n_fixed, ratio, budget, room,
                                                      quantize=quantize, cap_s=cap_s, layer=layer)

    pool = np.repeat([POOL_O, POOL_Q, POOL_S], [n_o, n_q, n_s])
    slot = np.concatenate([np.arange(n_o), np.arange(n_q), np.arange(n_s)])
    fixed = np.zeros_like(recent)
    fixed[:, :n_o] = protected
    # per head: its best O rows (any but Q's without Q) take the O slots left after its protected
    # ones, the best of the rest the Q slots, the next ones the spilled slots
    key = _rank_key(np.where(recent, np.inf, score.T), pos)
    may_o = ~fixed & ((pool == POOL_O) if quantize else (pool != POOL_Q))
    keep_o = _smallest(key, may_o, n_fixed - protected.sum(1) + n_o_keep)
    rest = ~fixed & ~keep_o
    to_q = _smallest(key, rest, n_q_keep)
    to_s = _smallest(key, rest, n_q_keep + n_s_keep) & ~to_q
    o_src, o_from = _in_place(keep_o | fixed, pos, pool, slot, POOL_O)
    q_src, q_from = _in_place(to_q, pos, pool, slot, POOL_Q)
    s_src, s_from = _in_place(to_s, pos, pool, slot, POOL_S)
    return LayerPlan(cap_o, o_src, q_src, q_from, s_src, s_from, o_from)


def slot_counts(n_rows: tuple[int, int, int], n_fixed: int, ratio: float, budget: Budget,
                room: int, *, quantize: bool, cap_s: int = 0,
                layer: int = 0) -> tuple[int, int, int, int]:
    """A layer's counts under the budget, the same in every KV head: (O rows kept besides the
    n_fixed protected ones, O slots, Q rows, spilled rows). `ratio` of the bytes beyond the
    protected rows and the room buys O slots (all of them when not `quantize`); Q takes what the
    O pool leaves, the spill the next rows."""
    n_o, n_q, n_s = n_rows
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
    return n_o_keep, cap_o, n_q_keep, min(cap_s, n_cand - n_o_keep - n_q_keep)


def _rank_key(rank: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """One unsigned key per row of the (head, row) arrays, smaller for the better row: higher
    rank (bits 31-62; NaN last), then the newer token (bits 0-30). Ranks are compared in
    float32, the precision of the attention statistics they come from."""
    assert pos.size == 0 or (pos.min() >= 0 and pos.max() < 2**31)
    f = (-rank).astype(np.float32) + np.float32(0.0)  # -0.0 ties with 0.0
    bits = f.view(np.uint32)
    code = np.where(bits >> 31, ~bits, bits | np.uint32(2**31))  # monotonic in the float
    code[np.isnan(f)] = 2**32 - 1
    return (code.astype(np.uint64) << np.uint64(31)) | (2**31 - 1 - pos).astype(np.uint64)


def _smallest(key: np.ndarray, among: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Per head (row), a mask of the k rows `among` marks with the smallest keys (each head has
    at least k such rows; keys are unique within a head, and exactly k are taken regardless)."""
    out = np.zeros_like(among)
    for h, kh in enumerate(np.broadcast_to(k, len(key))):
        if kh > 0:
            cand = np.where(among[h], key[h], np.uint64(2**64 - 1))
            out[h, np.argpartition(cand, kh - 1)[:kh]] = True
    return out & among


def _in_place(rows: np.ndarray, pos: np.ndarray, pool: np.ndarray, slot: np.ndarray,
              home: int) -> tuple[np.ndarray, np.ndarray]:
    """The sources (slot, pool; slots x heads) of pool `home`'s slots for the rows marked in
    `rows` (heads x rows; the same number in every head): a row already there keeps its slot
    (its bytes are not moved; attention does not depend on the order of rows), the others fill
    the free slots in position order. A plan then moves only the rows that change place."""
    n_head, n_rows = rows.shape
    n = int(rows[0].sum())
    home_rows = np.flatnonzero(pool == home)  # consecutive, slot 0 first
    start = int(home_rows[0]) if len(home_rows) else 0
    m = min(n, len(home_rows))
    stays = np.zeros_like(rows)
    stays[:, start:start + m] = rows[:, start:start + m]
    dst = np.full((n_head, n), -1, np.int64)
    dst[:, :m] = np.where(stays[:, start:start + m], np.arange(start, start + m), -1)
    moved = np.flatnonzero(rows & ~stays)  # head-major; per head by position:
    h, r = np.divmod(moved, n_rows)
    dst[dst < 0] = r[np.argsort((h << 31) | pos[h, r])]
    return (np.ascontiguousarray(slot[dst].T, np.int32),
            np.ascontiguousarray(pool[dst].T, np.uint8))


def drop_rows(lv: LayerView, score: np.ndarray, cap_o: int, drop: tuple[int, int],
              pos_max: int, *, window: int, sinks: int) -> LayerPlan:
    """One layer's plan for a context shift: the rows at positions in `drop` = [p0, p1) leave,
    every other row stays in its pool (and a spilled one in its slot). Where the KV heads would
    keep different numbers of rows in a pool (they must hold equal counts), each keeps that
    pool's smallest number: its window and sinks, then its highest-scored rows."""
    n_o, n_q, n_s = lv.n_rows
    pos = np.ascontiguousarray(lv.pos.T)  # (head, row)
    pool = np.repeat([POOL_O, POOL_Q, POOL_S], [n_o, n_q, n_s])
    slot = np.concatenate([np.arange(n_o), np.arange(n_q), np.arange(n_s)])
    keep = (pos < drop[0]) | (pos >= drop[1])
    key = _rank_key(np.where((pos > pos_max - window) | (pos < sinks), np.inf, score.T), pos)
    srcs = []
    for p in (POOL_O, POOL_Q, POOL_S):
        in_pool = keep & (pool == p)
        best = _smallest(key, in_pool, in_pool.sum(1).min())
        srcs.append(_in_place(best, pos, pool, slot, p)[0])
    o_src, q_src, s_src = srcs
    return LayerPlan(cap_o, o_src, q_src, np.full(q_src.shape, POOL_Q, np.uint8), s_src,
                     np.full(s_src.shape, POOL_S, np.uint8), np.full(o_src.shape, POOL_O, np.uint8))
