"""The planner (policies/planner.py) handles every KV head at once; these tests hold it to the
per-head loops it replaced, kept here as the reference, on random layouts: ties, NaN scores,
window rows outside O (after a cut), spilled rows, policies with and without Q."""

from __future__ import annotations

import numpy as np
import pytest

from arkv_local import defaults
from arkv_local.policies.planner import drop_rows, plan_layer, slot_counts, spill_to_o
from arkv_local.policies.types import POOL_O, POOL_Q, POOL_S, Budget, LayerView


def _ref_in_place(rows, pos, pool, slot, home):
    n = len(rows)
    stays = (pool[rows] == home) & (slot[rows] < n)
    dst = np.full(n, -1)
    dst[slot[rows[stays]]] = rows[stays]
    moved = rows[~stays]
    dst[dst < 0] = moved[np.argsort(pos[moved], kind="stable")]
    return slot[dst], pool[dst]


def ref_plan_layer(lv, score, ratio, budget, room, pos_max, *, window, sinks, quantize, cap_s):
    """plan_layer as it was, one head at a time (np.lexsort per head)."""
    n_o, n_q, n_s = lv.n_rows
    n_head = lv.pos_o.shape[1]
    pos = lv.pos
    recent = (pos > pos_max - window) | (pos < sinks)
    protected = recent[:n_o]
    n_fixed = int(protected.sum(0).max(initial=0))
    # the budget's arithmetic is shared (not what these tests hold to the old loops)
    n_o_keep, cap_o, n_q_keep, n_s_keep = slot_counts(lv.n_rows, n_fixed, ratio, budget, room,
                                                      quantize=quantize, cap_s=cap_s)
    pool = np.repeat([POOL_O, POOL_Q, POOL_S], [n_o, n_q, n_s])
    slot = np.concatenate([np.arange(n_o), np.arange(n_q), np.arange(n_s)])
    rank = np.where(recent, np.inf, score)
    out = {k: [] for k in ("o_src", "o_from", "q_src", "q_from", "s_src", "s_from")}
    for h in range(n_head):
        fixed = np.flatnonzero(protected[:, h])
        cand = np.setdiff1d(np.arange(len(pos)), fixed, assume_unique=True)
        cand = cand[np.lexsort((-pos[cand, h], -rank[cand, h]))]
        may_o = pool[cand] != POOL_Q if spill_to_o(quantize, ratio) else pool[cand] == POOL_O
        keep_o = cand[may_o][: n_fixed - len(fixed) + n_o_keep]
        rest = cand[~np.isin(cand, keep_o)]
        to_q, to_s = rest[:n_q_keep], rest[n_q_keep : n_q_keep + n_s_keep]
        for name, rows, home in (("o", np.concatenate([fixed, keep_o]), POOL_O),
                                 ("q", to_q, POOL_Q), ("s", to_s, POOL_S)):
            src, frm = _ref_in_place(rows, pos[:, h], pool, slot, home)
            out[name + "_src"].append(src)
            out[name + "_from"].append(frm)
    return cap_o, {k: np.stack(v, 1) if n_head else v for k, v in out.items()}


def ref_drop_rows(lv, score, drop, pos_max, *, window, sinks):
    """drop_rows's sources as they were, one head at a time."""
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
            rows = rows[np.lexsort((-pos[rows, h], -rank[rows, h]))][:k]
            src[:, h] = _ref_in_place(rows, pos[:, h], pool, slot, p)[0]
        srcs.append(src)
    return srcs


def random_layer(rng: np.random.Generator) -> tuple[LayerView, np.ndarray, int]:
    """A layer whose heads hold different positions in the same slots; scores with ties and,
    sometimes, NaN; returns the view, the scores and pos_max."""
    n_head = int(rng.integers(1, 5))
    n_o, n_q, n_s = (int(x) for x in rng.integers(0, 40, 3))
    n_o = max(n_o, 1)
    n = n_o + n_q + n_s
    n_pos = n + int(rng.integers(0, 20))  # some positions evicted
    pos = np.stack([rng.permutation(n_pos)[:n] for _ in range(n_head)], 1).astype(np.int32)
    levels = int(rng.integers(1, 6))  # few distinct scores: many ties
    score = rng.integers(0, levels, (n, n_head)).astype(np.float64) / levels
    if rng.random() < 0.3:
        score[rng.random((n, n_head)) < 0.1] = np.nan
    z = np.zeros((0, n_head))
    lv = LayerView(pos[:n_o], pos[n_o:n_o + n_q], z, z, z, z, pos[n_o + n_q:], z, z)
    return lv, score, n_pos - 1


@pytest.mark.parametrize("seed", range(300))
def test_plans_match_the_per_head_planner(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lv, score, pos_max = random_layer(rng)
    window, sinks = int(rng.integers(1, 8)), int(rng.integers(0, 3))
    quantize = bool(rng.random() < 0.6)
    cap_s = int(rng.integers(0, 20))
    room = int(rng.integers(1, 6))
    n_fixed = int(((lv.pos_o > pos_max - window) | (lv.pos_o < sinks)).sum(0).max(initial=0))
    budget = Budget(layer_bytes=int((n_fixed + room) * 10 + rng.integers(0, 600)), slot_o=10,
                    slot_q=3, align=1, cap_s=cap_s)
    ratio = 1.0 if rng.random() < 0.2 else float(rng.random())  # 1: ARKV's top layer
    kw = dict(window=window, sinks=sinks, quantize=quantize, cap_s=cap_s)
    plan = plan_layer(lv, score, ratio, budget, room, pos_max, **kw)
    cap_o, want = ref_plan_layer(lv, score, ratio, budget, room, pos_max, **kw)
    assert plan.cap_o == cap_o
    for name, arr in want.items():
        got = getattr(plan, name)
        assert got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr, err_msg=name)


@pytest.mark.parametrize("seed", range(100))
def test_drop_plans_match_the_per_head_planner(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lv, score, pos_max = random_layer(rng)
    window, sinks = int(rng.integers(1, 8)), int(rng.integers(0, 3))
    p0 = int(rng.integers(0, pos_max + 1))
    drop = (p0, p0 + int(rng.integers(0, 30)))
    plan = drop_rows(lv, score, 50, drop, pos_max, window=window, sinks=sinks)
    want = ref_drop_rows(lv, score, drop, pos_max, window=window, sinks=sinks)
    for got, arr in zip((plan.o_src, plan.q_src, plan.s_src), want, strict=True):
        np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("policy", ["quant", "arkv", "h2o"])
def test_a_simulated_read_keeps_the_budget_and_spills_the_rest(policy: str) -> None:
    # `bench plans` applies each plan to a simulated layout: after 2048 tokens at a quarter of
    # the f16 bytes, O and Q fit the budget and the spill holds every other token (none lost)
    from arkv_local.bench.plans import simulate

    r = simulate(policy, 2048, 0.25, n_layer=2, n_head_kv=2, head_dim=64)
    slot_o, slot_q = 2 * 2 * 64 * 2, 2 * 2 * 64 // 32 * 18
    n = r["rows"]
    assert n["o"] * slot_o + n["q"] * slot_q <= 512 * slot_o
    assert n["o"] + n["q"] + n["s"] == 2048
    assert r["plans"] == -(-2048 // r["chunk"]) - 1 and r["decode_plans"] == 0
    if policy != "arkv":  # arkv: a layer's share of f16 follows its statistics (random here)
        assert (n["q"] > 0) == (policy == "quant")


def test_bench_plans_prints_a_line_per_policy_and_depth() -> None:
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "arkv_local.bench", "plans", "--depths", "600",
                        "1200", "--policies", "quant", "arkv", "--layers", "2", "--heads", "2",
                        "--head-dim", "64", "--decode", "200"],
                       capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r["policy"], r["depth"]) for r in rows] == [("quant", 600), ("arkv", 600),
                                                         ("quant", 1200), ("arkv", 1200)]
    for r in rows:  # a plan per slack's worth of decoded tokens (slack_for the 25% budget)
        slack = defaults.slack_for(r["depth"] // 4)
        assert (r["depth"], slack) in ((600, 37), (1200, 64))
        assert r["decode_plans"] == -(-200 // slack) and r["decode_ms_per_plan"] > 0
        assert sum(r["rows"].values()) == r["depth"] + 200


def test_rows_sharing_a_position_still_fill_every_slot_once() -> None:
    # positions repeat within a head (as a model with several tokens per position would make):
    # equal keys, and still each head takes exactly as many rows as every other, each once
    rng = np.random.default_rng(7)
    n_o, n_q, n_head = 30, 40, 3
    pos = rng.integers(0, 20, (n_o + n_q, n_head)).astype(np.int32)
    z = np.zeros((0, n_head))
    lv = LayerView(pos[:n_o], pos[n_o:], z, z, z, z)
    score = rng.integers(0, 3, (n_o + n_q, n_head)).astype(np.float64)
    budget = Budget(layer_bytes=400, slot_o=10, slot_q=3, align=1)
    plan = plan_layer(lv, score, 0.5, budget, 2, 19, window=2, sinks=0, quantize=True)
    for src, frm in ((plan.o_src, plan.o_from), (plan.q_src, plan.q_from)):
        for h in range(n_head):
            taken = list(zip(frm[:, h].tolist(), src[:, h].tolist(), strict=True))
            assert len(set(taken)) == len(taken)
    assert len(plan.q_src) > 0 and plan.cap_o > len(plan.o_src)


@pytest.mark.parametrize("seed", range(40))
def test_smallest_takes_exact_counts_in_key_order_even_with_repeated_keys(seed: int) -> None:
    # the planner's selection: per head, consecutive groups of exactly the counts asked for,
    # among the marked rows only, each group's keys no larger than the next one's; keys repeat
    # (rows sharing a position and a score) at the thresholds, the case a threshold alone
    # would take too many rows in
    from arkv_local.policies.planner import _smallest

    rng = np.random.default_rng(seed)
    n_head, n = int(rng.integers(1, 5)), int(rng.integers(1, 60))
    key = rng.integers(0, int(rng.integers(1, 8)), (n_head, n)).astype(np.uint64)
    among = rng.random((n_head, n)) < 0.8
    avail = int(among.sum(1).min())
    k1 = rng.integers(0, avail + 1, n_head)  # per head, or one count for all
    if rng.random() < 0.5:
        k1 = int(k1[0])
    k2 = int(rng.integers(0, avail - int(np.max(k1)) + 1))
    g1, g2 = _smallest(key, among, k1, k2)
    for h in range(n_head):
        a, b = np.flatnonzero(g1[h]), np.flatnonzero(g2[h])
        assert len(a) == np.broadcast_to(k1, n_head)[h] and len(b) == k2
        assert among[h, a].all() and among[h, b].all() and not (g1[h] & g2[h]).any()
        rest = key[h, among[h] & ~g1[h] & ~g2[h]]
        if len(a) and len(b):
            assert key[h, a].max() <= key[h, b].min()
        if len(rest) and (len(a) or len(b)):
            assert key[h, np.concatenate([a, b])].max() <= rest.min()


@pytest.mark.parametrize("policy", ["arkv", "h2o", "quant", "window"])
def test_plans_on_threads_equal_plans_on_one(policy: str) -> None:
    # layers large enough to be planned on threads (ARKV's memory of earlier scores included):
    # each plan, and what undoing the last leaves, the same array for array as on one thread
    import threading

    from arkv_local.policies import make_policy
    from arkv_local.policies.base import _ROWS_PER_THREAD
    from arkv_local.policies.types import KVView

    rng = np.random.default_rng(7)
    n_layer, heads, slot_o, slot_q = 4, 8, 4096, 1152
    one, many = make_policy(policy), make_policy(policy)
    names: set[str] = set()
    scores = many.scores

    def scored_on(view: KVView, layer: int) -> np.ndarray:
        names.add(threading.current_thread().name)
        return scores(view, layer)

    many.scores = scored_on  # type: ignore[method-assign]
    for n in (_ROWS_PER_THREAD // heads + 500, _ROWS_PER_THREAD // heads + 900):
        pos = np.repeat(np.arange(n, dtype=np.int32)[:, None], heads, 1)
        layers = []
        for _ in range(n_layer):
            m_o = rng.random((n - 300, heads), np.float32)
            m_q = rng.random((300, heads), np.float32)
            layers.append(LayerView(pos[:-300], pos[-300:], m_o, m_o**2, m_q, m_q**2))
        view = KVView(layers, n_queries=32, group=4, stats=rng.random((n_layer, 3)),
                      pos_max=n - 1, n_positions=4096)
        budget = Budget(n // 2 * slot_o, slot_o, slot_q)
        for a, b in zip(one.plan(view, budget, 64), many.plan(view, budget, 64, threads=3),
                        strict=True):
            assert a.cap_o == b.cap_o
            for name in ("o_src", "o_from", "q_src", "q_from", "s_src", "s_from"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # scored on the plan threads, not the caller's (how many of the 3 take a task is the pool's)
    assert names and all(x.startswith("arkv-plan") for x in names), names
    one.planned(False)
    many.planned(False)
    assert one.snapshot().keys() == many.snapshot().keys()
    for a, b in zip(getattr(one, "_past", []), getattr(many, "_past", []), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        one.plan(view, budget, 64, threads=0)


def test_a_layer_kept_in_f16_takes_its_spilled_rows_back_into_o() -> None:
    # ARKV gives its highest-scoring layer ratio 1 (every other layer less): all of its bytes
    # buy O slots and it has no Q slot. Spilled rows of a quantizing policy come back into Q
    # only, so there they never came back; they take O slots, as with a policy without Q
    o = np.array([[1], [2], [3], [4], [5], [6], [7], [8], [19], [20]], np.int32)  # 19, 20: window
    s = np.array([[9], [10], [11]], np.int32)
    z = np.zeros((0, 1))
    lv = LayerView(o, np.zeros((0, 1), np.int32), z, z, z, z, s, z, z)
    score = np.array([[0.1]] * 10 + [[1.0]] * 3)  # the question looked at the spilled rows
    budget = Budget(layer_bytes=90, slot_o=10, slot_q=3, align=1, cap_s=3)  # 9 O slots
    kw = dict(window=2, sinks=0, cap_s=3)
    assert budget.cap_q(9) == 0
    plan = plan_layer(lv, score, 1.0, budget, 1, 20, quantize=True, **kw)
    assert plan.cap_o == 9 and plan.q_src.shape[0] == 0
    came_back = plan.o_from[:, 0] == POOL_S
    assert sorted(s[plan.o_src[came_back, 0], 0]) == [9, 10, 11]
    # below ratio 1 the layer has Q slots, and the spilled rows come back there
    plan = plan_layer(lv, score, 0.5, budget, 1, 20, quantize=True, **kw)
    assert (plan.o_from != POOL_S).all()
    assert sorted(s[plan.q_src[plan.q_from[:, 0] == POOL_S, 0], 0]) == [9, 10, 11]
