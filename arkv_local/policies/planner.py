"""The planner: from a policy's ratios and scores to a tri-state layout under a byte budget.

A pure function of numpy arrays, the same for every policy: it protects the window and the
sinks, ranks the other tokens of each (layer, KV head), keeps the top ones in O, moves the
next ones to Q as far as the bytes go, spills the next ones to S (host memory) as far as the
spill holds, and evicts the rest, leaving room for new tokens.
"""

from __future__ import annotations

import numpy as np

from .types import POOL_O, POOL_Q, POOL_S, Budget, LayerPlan, LayerView

_POOLS = (POOL_O, POOL_Q, POOL_S)  # the order of a layer's rows


def plan_layer(lv: LayerView, score: np.ndarray, ratio: float, budget: Budget, room: int,
               pos_max: int, *, window: int, sinks: int, quantize: bool, cap_s: int = 0,
               layer: int = 0) -> LayerPlan:
    """One layer's plan. `score` ranks every row (O, then Q, then S, as `lv.pos`). `ratio` of
    the bytes beyond the window, sinks and room buys O slots (all of them when not `quantize`),
    Q takes what the O pool leaves. Spilled rows come back into Q, or into O (spill_to_o); they
    stay in their S slots otherwise, so that a plan moves only what changes."""
    n_o, n_q, n_s = lv.n_rows
    pos = np.ascontiguousarray(lv.pos.T)  # (head, row): every head at once, its rows contiguous
    n_rows = len(lv.pos)
    recent = (pos > pos_max - window) | (pos < sinks)
    # the window and sinks stay in O. After a cut of the tail (Tailor.cut) the new window's older
    # rows may be in Q, spilled or evicted in some heads: such a head fills the protected slots
    # it cannot use with its best other rows, its window rows ranked first
    protected = recent[:, :n_o]
    n_fixed = int(protected.sum(1).max(initial=0))
    n_o_keep, cap_o, n_q_keep, n_s_keep = slot_counts(lv.n_rows, n_fixed, ratio, budget, room,
                                                      quantize=quantize, cap_s=cap_s, layer=layer)

    # per head: its best O rows (any but Q's without Q) take the O slots left after its protected
    # ones, the best of the rest the Q slots, the next ones the spilled slots
    key = _rank_key(score, recent, pos)
    fixed = np.zeros_like(recent)
    fixed[:, :n_o] = protected
    n_may = n_rows if spill_to_o(quantize, ratio) else n_o  # rows that may take O lie before
    may_o = ~fixed[:, :n_may]
    may_o[:, n_o:n_o + n_q] = False
    keep_o = np.zeros_like(fixed)
    keep_o[:, :n_may] = _smallest(key[:, :n_may], may_o, n_fixed - protected.sum(1) + n_o_keep)[0]
    to_q, to_s = _smallest(key, ~fixed & ~keep_o, n_q_keep, n_s_keep)
    o_src, o_from = _in_place(keep_o | fixed, pos, lv.n_rows, POOL_O)
    q_src, q_from = _in_place(to_q, pos, lv.n_rows, POOL_Q)
    s_src, s_from = _in_place(to_s, pos, lv.n_rows, POOL_S)
    return LayerPlan(cap_o, o_src, q_src, q_from, s_src, s_from, o_from)


def spill_to_o(quantize: bool, ratio: float) -> bool:
    """Whether spilled rows may come back into O slots: with a policy without Q, and in a layer
    kept in f16 (ratio 1, as ARKV's highest-scoring layer), which has at most the few Q slots
    the O pool leaves over. Otherwise they come back into Q."""
    return not quantize or ratio >= 1.0


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
    n_o_cand = n_o - n_fixed + (n_s if spill_to_o(quantize, ratio) else 0)  # may take an O slot
    o_budget = int(ratio * free) // budget.slot_o if quantize else free // budget.slot_o
    n_o_keep = min(o_budget, n_o_cand)
    cap_o = n_fixed + n_o_keep + room
    n_q_keep = min(budget.cap_q(cap_o) if quantize else 0, n_cand - n_o_keep)
    return n_o_keep, cap_o, n_q_keep, min(cap_s, n_cand - n_o_keep - n_q_keep)


def _rank_key(score: np.ndarray, recent: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """One unsigned key per row of the (head, row) arrays from the (row, head) scores, smaller
    for the better row: recent rows first, then higher score (bits 31-62; NaN last), then the
    newer token (bits 0-30). Scores are compared in float32, the precision of the attention
    statistics they come from."""
    assert pos.size == 0 or (pos.min() >= 0 and pos.max() < 2**31)
    f = np.ascontiguousarray(np.asarray(score, np.float32).T)
    np.negative(f, out=f)
    f[recent] = -np.inf
    f += np.float32(0.0)  # -0.0 ties with 0.0
    bits = f.view(np.uint32)  # flipped to be monotonic in the float: all bits of a negative one
    code = bits ^ ((f.view(np.int32) >> 31).view(np.uint32) | np.uint32(2**31))
    code[np.isnan(f)] = 2**32 - 1
    key = code.astype(np.uint64)
    key <<= np.uint64(31)
    key |= (2**31 - 1 - pos).astype(np.uint64)
    return key


def _smallest(key: np.ndarray, among: np.ndarray, *counts: int | np.ndarray) -> list[np.ndarray]:
    """Per head (row), masks of the rows `among` marks by increasing key: the first counts[0]
    rows, the next counts[1], ... (each head has that many such rows). Each group ends at a
    threshold key, found by np.partition; a head whose keys repeat at a threshold (rows sharing a
    position and a score) takes exactly as many by np.argpartition."""
    n_head = len(key)
    ends = np.cumsum([np.broadcast_to(k, n_head) for k in counts], axis=0)  # (groups, heads)
    cand = np.where(among, key, np.uint64(2**64 - 1))
    taken = np.zeros_like(among)
    repeated = np.zeros(n_head, bool)  # heads with more rows at a threshold than it may take
    outs = []
    for end in ends:
        if not end.any():
            outs.append(np.zeros_like(among))
            continue
        kth = np.maximum(end, 1) - 1
        if (kth == kth[0]).all():
            t = np.partition(cand, kth[0], axis=1)[:, kth[0]]
        else:
            t = np.array([np.partition(c, k)[k] for c, k in zip(cand, kth, strict=True)])
        upto = (cand <= t[:, None]) & (end > 0)[:, None]
        repeated |= upto.sum(1) != end
        outs.append(upto & ~taken)
        taken = upto
    for h in np.flatnonzero(repeated):
        part = np.argpartition(cand[h], np.maximum(ends[:, h], 1) - 1)
        for out, a, b in zip(outs, np.concatenate([[0], ends[:-1, h]]), ends[:, h], strict=True):
            out[h] = False
            out[h, part[a:b]] = True
    return [out & among for out in outs]


def _in_place(rows: np.ndarray, pos: np.ndarray, n_rows: tuple[int, int, int],
              home: int) -> tuple[np.ndarray, np.ndarray]:
    """The sources (slot, pool; slots x heads) of pool `home`'s slots for the rows marked in
    `rows` (heads x rows, O then Q then S as n_rows counts them; the same number in every head):
    a row already there keeps its slot (its bytes are not moved; attention does not depend on
    the order of rows), the others fill the free slots in position order. A plan then moves
    only the rows that change place."""
    n_head = len(rows)
    starts = np.cumsum([0, *n_rows])
    lo, n_home = int(starts[_POOLS.index(home)]), n_rows[_POOLS.index(home)]
    n = int(rows[0].sum()) if n_head else 0
    m = min(n, n_home)
    src = np.empty((n_head, n), np.int32)
    frm = np.empty((n_head, n), np.uint8)
    src[:, :m] = np.arange(m, dtype=np.int32)
    frm[:, :m] = home
    free = np.ones((n_head, n), bool)
    np.logical_not(rows[:, lo:lo + m], out=free[:, :m])
    moved = rows.copy()
    moved[:, lo:lo + m] = False
    h, r = np.divmod(np.flatnonzero(moved), moved.shape[1])  # head-major; per head by position:
    r = r[np.argsort((h << 31) | pos[h, r])]
    which = np.searchsorted(starts[1:3], r, side="right")
    src[free] = r - starts[which]
    frm[free] = np.array(_POOLS, np.uint8)[which]
    return np.ascontiguousarray(src.T), np.ascontiguousarray(frm.T)


def drop_rows(lv: LayerView, score: np.ndarray, cap_o: int, drop: tuple[int, int],
              pos_max: int, *, window: int, sinks: int) -> LayerPlan:
    """One layer's plan for a context shift: the rows at positions in `drop` = [p0, p1) leave,
    every other row stays in its pool (and a spilled one in its slot). Where the KV heads would
    keep different numbers of rows in a pool (they must hold equal counts), each keeps that
    pool's smallest number: its window and sinks, then its highest-scored rows."""
    n_o, n_q, n_s = lv.n_rows
    pos = np.ascontiguousarray(lv.pos.T)  # (head, row)
    pool = np.repeat(_POOLS, lv.n_rows)
    keep = (pos < drop[0]) | (pos >= drop[1])
    key = _rank_key(score, (pos > pos_max - window) | (pos < sinks), pos)
    srcs = []
    for p in _POOLS:
        in_pool = keep & (pool == p)
        best = _smallest(key, in_pool, in_pool.sum(1).min())[0]
        srcs.append(_in_place(best, pos, lv.n_rows, p)[0])
    o_src, q_src, s_src = srcs
    return LayerPlan(cap_o, o_src, q_src, np.full(q_src.shape, POOL_Q, np.uint8), s_src,
                     np.full(s_src.shape, POOL_S, np.uint8), np.full(o_src.shape, POOL_O, np.uint8))
