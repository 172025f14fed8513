"""Policy math on small hand-checked cases: OQ ratios, heavy hitters, smoothing, plans."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from arkv_local.policies import (
    ARKV,
    H2O,
    Budget,
    KVView,
    LayerView,
    Policy,
    Quant,
    Window,
    make_policy,
)
from arkv_local.policies.scores import (
    heavy_hitter,
    oq_ratios,
    smooth_by_position,
    spread_by_position,
    token_peaks,
)
from arkv_local.policies.types import POOL_O, POOL_Q


def test_oq_ratios_by_hand() -> None:
    stats = np.array([[16.0, 4.0, 81.0], [1.0, 1.0, 1.0], [81.0, 16.0, 16.0]])
    # tau = (2, 2, 4): s = sqrt(E) * sqrt(V) * K^(1/4)
    s = np.array([4 * 2 * 3, 1.0, 9 * 4 * 2])
    np.testing.assert_allclose(oq_ratios(stats, (2, 2, 4)), s / s.max())
    assert oq_ratios(None, (1, 1, 1)) is None
    assert oq_ratios(np.zeros((3, 3)), (1, 1, 1)) is None  # nothing measured: rho = 1 later


def test_heavy_hitter_mean_plus_gamma_variance() -> None:
    # two samples of p: 0.2 and 0.6 -> sums 0.8 and 0.4; mean 0.4, variance 0.04
    hh = heavy_hitter(np.array([0.8]), np.array([0.4]), n=2, gamma=10.0)
    np.testing.assert_allclose(hh, [0.4 + 10 * 0.04])
    # one sample: no variance term
    np.testing.assert_allclose(heavy_hitter(np.array([0.3]), np.array([0.09]), 1, 10.0), [0.3])
    np.testing.assert_array_equal(heavy_hitter(np.array([0.3]), np.array([0.1]), 0, 1.0), [0.0])


def test_smoothing_follows_positions_not_slots() -> None:
    score = np.array([5.0, 0.0, 10.0, 0.0, 0.0])
    pos = np.array([10, 0, 20, 30, 40])  # slot order differs from position order
    # in position order: [0, 5, 10, 0, 0]; width-5 mean with zero padding
    expected_by_pos = np.array([15, 15, 15, 15, 10]) / 5
    np.testing.assert_allclose(smooth_by_position(score, pos), expected_by_pos[np.argsort(pos)])
    # fewer tokens than the width: still one score per token, the same zero padding
    np.testing.assert_allclose(smooth_by_position(np.array([5.0, 10.0]), np.array([3, 1])),
                               [15 / 5, 15 / 5])
    np.testing.assert_allclose(smooth_by_position(np.array([1.0]), np.array([0])), [0.2])
    # no token at all (a cache just cleared): no score, not the kernel's overhang
    assert smooth_by_position(np.zeros(0), np.zeros(0, int)).shape == (0,)


def test_pooling_by_position_treats_each_kv_head_alone() -> None:
    # (rows, heads) at once: each column as np.convolve (mean) and a sliding max see it alone
    rng = np.random.default_rng(0)
    score = rng.random((40, 3))
    pos = np.stack([rng.permutation(100)[:40] for _ in range(3)], 1)
    for h in range(3):
        order = np.argsort(pos[:, h])
        by_pos = np.pad(score[order, h], 2)
        mean = np.empty(40)
        mean[order] = np.convolve(by_pos, np.ones(5) / 5, mode="valid")
        np.testing.assert_allclose(smooth_by_position(score, pos)[:, h], mean, rtol=1e-12)
        by_pos = np.pad(score[order, h], 7)
        top = np.empty(40)
        top[order] = np.lib.stride_tricks.sliding_window_view(by_pos, 15).max(1)
        np.testing.assert_array_equal(spread_by_position(score, pos, 15)[:, h], top)


def test_token_peaks_by_hand() -> None:
    # per (layer, head, row): sum(p^2) / sum(p); sinks [0, 1) and window (pos_max - 2, pos_max]
    # count 0; the max over layers and heads, as a share of the largest
    layer = SimpleNamespace
    a = layer(pos=np.array([[0, 9], [3, 3], [5, 1], [9, 5]]),
              mass=np.array([[1.0, 1.0], [0.5, 0.4], [0.2, 0.0], [1.0, 0.1]]),
              mass_sq=np.array([[0.9, 1.0], [0.2, 0.04], [0.16, 0.0], [1.0, 0.01]]))
    b = layer(pos=np.array([[2], [4]]), mass=np.array([[0.3], [0.0]]),
              mass_sq=np.array([[0.12], [0.0]]))
    # a, head 0: 0 and 9 out, 3 -> 0.4, 5 -> 0.8; head 1: 9 out, 3 -> 0.1, 1 -> 0 (no mass),
    # 5 -> 0.1; b: 2 -> 0.4, 4 -> 0; then / 0.8
    peaks = token_peaks([a, b], pos_max=9, sinks=1, window=2)
    np.testing.assert_allclose(peaks, [0, 0, 0.5, 0.5, 0, 1, 0, 0, 0, 0])
    # nothing attended: all zero (no division by zero)
    none = layer(pos=np.array([[3]]), mass=np.zeros((1, 1)), mass_sq=np.zeros((1, 1)))
    np.testing.assert_array_equal(token_peaks([none], 5, 0, 1), np.zeros(6))


@pytest.mark.parametrize("cls", [ARKV, H2O])
def test_heavy_hitters_plan_an_empty_cache(cls: type[Policy]) -> None:
    # a tailoring before the first token of a new sequence: every slot goes to the new tokens
    empty = np.zeros((0, 2))
    lv = LayerView(empty.astype(int), empty.astype(int), empty, empty, empty, empty)
    view = KVView([lv, lv], 0, 1, None, -1)
    plans = cls(window=2, sinks=1, slack=3).plan(view, Budget(100, 10, 3, align=1), room=5)
    assert [(p.cap_o, p.o_src.shape, p.q_src.shape) for p in plans] == [(5, (0, 2), (0, 2))] * 2


def layer(pos_o: list[list[int]], mass_o: list[list[float]], pos_q: list[list[int]] | None = None,
          mass_q: list[list[float]] | None = None) -> LayerView:
    po, mo = np.array(pos_o), np.array(mass_o, float)
    pq = np.array(pos_q if pos_q else np.zeros((0, po.shape[1])), int)
    mq = np.array(mass_q if mass_q else np.zeros((0, po.shape[1])), float)
    return LayerView(po, pq, mo, mo**2, mq, mq**2)


# costs: an O slot 10 bytes, a Q slot 3; Q takes the bytes O leaves (no alignment padding)
BUDGET = Budget(layer_bytes=100, slot_o=10, slot_q=3, align=1)


class ByMass(Policy):
    """Importance = the attention mass as given (no smoothing), for exact expectations."""

    def scores(self, view: KVView, i: int) -> np.ndarray:
        return view.layers[i].mass


class Half(ByMass):
    def ratios(self, view: KVView) -> np.ndarray:
        return np.full(len(view.layers), 0.5)


def test_plan_keeps_window_and_heavy_hitters_then_quantizes_then_evicts() -> None:
    # 8 tokens, 2 heads; window 2 (positions 6, 7); room 1 -> the window and room cost 30 bytes,
    # 70 remain: ratio 0.5 -> 35 bytes of O = 3 slots; 70 - 30 = 40 bytes of Q = 13 slots
    pos = [[p, p] for p in range(8)]
    mass = [[0.1, 0.9], [0.8, 0.1], [0.3, 0.2], [0.9, 0.3], [0.2, 0.8], [0.5, 0.7],
            [0.0, 0.0], [0.0, 0.0]]
    view = KVView([layer(pos, mass)], n_queries=4, group=1, stats=None, pos_max=7)
    (plan,) = Half(window=2, sinks=0, slack=1).plan(view, BUDGET, room=1)
    assert plan.cap_o == 2 + 3 + 1
    # head 0 keeps positions 1, 3, 5 (mass .8, .9, .5); head 1 keeps 0, 4, 5 (.9, .8, .7).
    # Rows already in an O slot below the new count stay there (1 and 3; 0 and 4): not moved;
    # the others fill the free slots in position order
    assert plan.o_src[:, 0].tolist() == [5, 1, 6, 3, 7]
    assert plan.o_src[:, 1].tolist() == [0, 5, 6, 7, 4]
    # the other 3 tokens of each head fit in Q (13 slots), in position order, from O
    assert plan.q_src[:, 0].tolist() == [0, 2, 4] and plan.q_src[:, 1].tolist() == [1, 2, 3]
    assert (plan.q_from == POOL_O).all()


def test_a_layout_the_plan_keeps_moves_nothing() -> None:
    # The layout the first test's plan made (O slots hold positions 5 1 6 3 7, Q slots 0 2 4)
    # with the same ranking: every row keeps its slot, so applying the plan moves no bytes
    # (sorting rows by position would move four of them)
    view = KVView([layer([[5], [1], [6], [3], [7]], [[0.5], [0.8], [0.0], [0.9], [0.0]],
                         pos_q=[[0], [2], [4]], mass_q=[[0.1], [0.3], [0.2]])], 4, 1, None, 7)
    (plan,) = Half(window=2, sinks=0, slack=1).plan(view, BUDGET, room=1)
    assert plan.o_src[:, 0].tolist() == [0, 1, 2, 3, 4] and (plan.o_from == POOL_O).all()
    assert plan.q_src[:, 0].tolist() == [0, 1, 2] and (plan.q_from == POOL_Q).all()


def test_plan_evicts_what_the_bytes_do_not_buy() -> None:
    # budget 60: window 2 + room 1 = 30 bytes, 30 left; ratio 1 -> 3 O slots, no Q bytes left
    pos = [[p] for p in range(8)]
    mass = [[0.1], [0.8], [0.3], [0.9], [0.2], [0.5], [0.0], [0.0]]
    view = KVView([layer(pos, mass)], 4, 1, None, 7)
    budget = Budget(60, 10, 3, align=1)
    (plan,) = ByMass(window=2, sinks=0, slack=1).plan(view, budget, room=1)
    assert plan.o_src[:, 0].tolist() == [5, 1, 6, 3, 7]  # 1 and 3 stay in their slots
    assert len(plan.q_src) == 0  # 0.1, 0.3 and 0.2 are evicted
    # a quantizing half split: 15 bytes of O -> 1 slot; 20 bytes of Q -> 6 slots, 5 tokens left
    (plan,) = Half(window=2, sinks=0, slack=1).plan(view, budget, room=1)
    assert plan.o_src[:, 0].tolist() == [3, 6, 7]
    assert plan.q_src[:, 0].tolist() == [0, 1, 2, 4, 5]


def test_quantized_tokens_never_return_to_o() -> None:
    # position 0 is in Q with the highest score: it stays Q while O goes to the next one.
    # 50 bytes: window + room 30, 20 left, half -> 1 O slot, 10 bytes -> 3 Q slots
    view = KVView([layer([[1], [2], [3], [4]], [[0.2], [0.1], [0.0], [0.0]],
                         pos_q=[[0]], mass_q=[[0.9]])], 4, 1, None, 4)
    (plan,) = Half(window=2, sinks=0, slack=1).plan(view, Budget(50, 10, 3, align=1),
                                                    room=1)
    assert plan.o_src[:, 0].tolist() == [0, 3, 2]  # O slots 0, 2, 3 = positions 1, 3, 4
    assert plan.q_src[:, 0].tolist() == [0, 1] and plan.q_from[:, 0].tolist() == [POOL_Q, POOL_O]


def test_sinks_stay_in_o() -> None:
    pos = [[p] for p in range(10)]
    mass = [[0.0]] * 10
    view = KVView([layer(pos, mass)], 4, 1, None, 9)
    budget = Budget(70, 10, 3, align=1)
    (plan,) = Window(window=2, sinks=2, slack=1).plan(view, budget, room=1)
    # 70 bytes: sinks 2 + window 2 + room 1 = 50, 20 left -> 2 more O slots, the newest
    assert plan.o_src[:, 0].tolist() == [0, 1, 6, 7, 8, 9]


def test_a_window_a_cut_left_outside_o_is_ranked_first() -> None:
    # after a cut of the tail (Tailor.cut) the new window (6, 7) may miss O in some heads: head 1
    # holds 6 in Q. Each head still keeps n_fixed = 2 protected O slots: head 1 fills its second
    # with its best other O row, and its window row 6 keeps the one Q slot over the heavier 1.
    # 54 bytes: window 2 + room 1 = 30, 24 left -> 2 more O slots (cap_o 5), 1 Q slot
    pos_o, mass_o = [[1, 0], [3, 3], [6, 5], [7, 7]], [[0.3, 0.2], [0.4, 0.5], [0, 0.6], [0, 0]]
    view = KVView([layer(pos_o, mass_o, pos_q=[[0, 6], [2, 1]], mass_q=[[0.1, 0.0], [0.2, 0.9]])],
                  4, 1, None, 7)
    (plan,) = ByMass(window=2, sinks=0, slack=1).plan(view, Budget(54, 10, 3, align=1), room=1)
    assert plan.cap_o == 5
    assert sorted(view.layers[0].pos_o[plan.o_src[:, 0], 0]) == [1, 3, 6, 7]
    assert sorted(view.layers[0].pos_o[plan.o_src[:, 1], 1]) == [0, 3, 5, 7]
    assert plan.q_src[:, 0].tolist() == [1] and plan.q_src[:, 1].tolist() == [0]  # 2; and 6
    assert (plan.q_from == POOL_Q).all()


def test_budget_below_window_and_room_is_named() -> None:
    view = KVView([layer([[p] for p in range(8)], [[0.0]] * 8)], 4, 1, None, 7)
    with pytest.raises(ValueError, match="cannot hold the window and sinks"):
        ByMass(window=6, slack=5).plan(view, BUDGET, room=5)


def test_baselines_use_their_states() -> None:
    view = KVView([layer([[p] for p in range(40)], [[1.0 / (p + 1)] for p in range(40)])],
                  4, 1, np.array([[1.0, 1.0, 1.0]]), 39)
    budget = Budget(200, 10, 3, align=1)
    (w,) = Window(window=4, sinks=0, slack=2).plan(view, budget, room=2)
    (h,) = H2O(window=4, sinks=0, slack=2).plan(view, budget, room=2)
    (q,) = Quant(window=4, sinks=0, slack=2).plan(view, budget, room=2)
    (a,) = ARKV(window=4, sinks=0, slack=2).plan(view, budget, room=2)
    assert len(w.q_src) == len(h.q_src) == 0          # eviction only
    assert w.o_src[:, 0].tolist() == list(range(22, 40))  # the window and the newest 14
    assert h.o_src[:, 0].tolist()[:3] == [0, 1, 2]        # the heaviest (earliest) ones
    assert len(q.o_src) == 4 and len(q.q_src) == 36       # everything but the window in Q
    assert len(a.o_src) == 18 and len(a.q_src) == 0       # one layer: rho = 1


def test_heavy_hitter_ema_blends_scores_by_position() -> None:
    # two tailorings: positions 0-3, then 1-5 (0 evicted, 4 and 5 new); one head, 2 queries
    first = layer([[0], [1], [2], [3]], [[0.4], [0.2], [0.1], [0.3]])
    second = layer([[1], [2], [3], [4], [5]], [[0.1], [0.5], [0.3], [0.0], [0.1]])

    def hh(lv: LayerView) -> np.ndarray:  # what one tailoring alone scores
        n = 2 * 1
        raw = heavy_hitter(lv.mass_o, lv.mass_sq_o, n, 0.8)[:, 0]
        return smooth_by_position(raw, lv.pos_o[:, 0])

    policy = H2O(gamma=0.8, ema=0.25)
    s1 = policy.scores(KVView([first], 2, 1, None, 3), 0)
    np.testing.assert_allclose(s1[:, 0], hh(first))  # nothing to remember yet
    s2 = policy.scores(KVView([second], 2, 1, None, 5), 0)
    want = hh(second)
    want[:3] = 0.25 * hh(first)[1:] + 0.75 * want[:3]  # positions 1-3 were scored before
    np.testing.assert_allclose(s2[:, 0], want)
    # a plan that could not be applied leaves the memory as it was (growth included)
    policy.planned(applied=True)  # the plans above were applied
    later = layer([[1], [2], [9]], [[0.7], [0.0], [0.2]])
    policy.scores(KVView([later], 2, 1, None, 9), 0)
    policy.planned(applied=False)
    np.testing.assert_allclose(policy.scores(KVView([second], 2, 1, None, 5), 0)[:, 0],
                               0.25 * s2[:, 0] + 0.75 * hh(second))
    policy.planned(applied=True)
    policy.reset()  # a new sequence forgets
    s3 = policy.scores(KVView([second], 2, 1, None, 5), 0)
    np.testing.assert_allclose(s3[:, 0], hh(second))
    with pytest.raises(ValueError, match="ema must be in"):
        H2O(ema=1.0)


def test_policy_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown kv_policy 'lru'"):
        make_policy("lru")
    with pytest.raises(ValueError, match="arkv tau must be three positive numbers"):
        make_policy("arkv", tau=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="kv_policy 'window' has no knob tau"):
        make_policy("window", tau=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="window must be >= 1"):
        make_policy("h2o", window=0)
    with pytest.raises(ValueError, match="need a kv_policy other than 'full'"):
        make_policy("full", window=8)
    assert make_policy("full") is None
    assert isinstance(make_policy("arkv", gamma=0.8, tau=(0.1, 0.3, 0.6)), ARKV)
    # not numbers, or not finite: NaN scores in every plan (gamma), a raw TypeError (tau)
    for gamma in (float("nan"), float("inf"), -0.5, "0.8", True):
        with pytest.raises(ValueError, match=f"gamma must be a finite number >= 0, got {gamma!r}"):
            make_policy("arkv", gamma=gamma)
        with pytest.raises(ValueError, match="gamma must be a finite number"):
            make_policy("h2o", gamma=gamma)
    for tau in ("abc", (1.0, "2", 3.0), (1.0, float("inf"), 1.0), (1.0, float("nan"), 1.0), 5):
        with pytest.raises(ValueError, match="arkv tau must be three positive numbers"):
            make_policy("arkv", tau=tau)
    assert make_policy("h2o", gamma=0).gamma == 0


def test_budget_arithmetic_by_hand() -> None:
    # per K or V arena 500 bytes; an O row 10 bytes, a Q row 3; the Q pool starts 64-aligned
    b = Budget(layer_bytes=1000, slot_o=20, slot_q=6)
    assert b.cap_o_max == 50
    assert b.cap_q(1) == (500 - 64) // 3 and b.cap_q(6) == (500 - 64) // 3
    assert b.cap_q(7) == (500 - 128) // 3 and b.cap_q(50) == 0 and b.cap_q(49) == 0
    assert Budget(1000, 20, 6, align=1).cap_q(49) == 10 // 3


NO_NATIVE = """
import sys
sys.modules["arkv_local.arkv_cpp"] = None   # as if the native library were not built
sys.modules["llama_cpp"] = None             # nor llama-cpp-python installed
import numpy as np
from arkv_local.policies import ARKV, Budget, KVView, LayerView
pos = np.arange(40)[:, None].repeat(2, 1)
mass = 1.0 / (pos + 1.0)
lv = LayerView(pos, np.zeros((0, 2), int), mass, mass**2, np.zeros((0, 2)), np.zeros((0, 2)))
view = KVView([lv, lv], 4, 1, np.array([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]), 39)
plan = ARKV(window=4, sinks=0, slack=2).plan(view, Budget(400, 10, 4, align=1), room=2)
print(len(plan), [len(p.o_src) for p in plan], [len(p.q_src) for p in plan])
try:
    from arkv_local import Llama
except ImportError as e:
    print("Llama:", e)
"""


def test_policies_work_without_the_native_library() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent  # this checkout's package
    run = subprocess.run([sys.executable, "-c", NO_NATIVE], capture_output=True, text=True,
                         timeout=60, cwd=repo)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "2 [38, 4] [0, 36]"
    assert lines[1].startswith("Llama: ") and "arkv_local.arkv_cpp" in lines[1]


def test_h2o_and_arkv_share_the_heavy_hitter_score() -> None:
    # the README says H2O keeps heavy hitters "with the same scores as ARKV": same gamma
    assert H2O().gamma == ARKV().gamma == 0.8
    pos = [[p, p] for p in range(12)]
    mass = [[0.1 * (p % 5), 0.05 * (p % 3)] for p in range(12)]
    lv = layer(pos, mass)
    lv = LayerView(lv.pos_o, lv.pos_q, lv.mass_o, lv.mass_o**2 * 3, lv.mass_q, lv.mass_q)
    view = KVView([lv], 4, 2, None, 11)  # 8 samples: the variance term counts
    np.testing.assert_array_equal(H2O().scores(view, 0), ARKV().scores(view, 0))


def test_heavy_hitter_memory_is_made_for_the_window_and_shifts_in_place() -> None:
    """ema's memory of earlier scores, by position: made once for the whole window (a chat's
    memory does not grow as positions come), moved back in place by a context shift."""
    policy = H2O(gamma=0.8, ema=0.5)
    first = layer([[0], [1], [2], [3], [4], [5]], [[0.4], [0.2], [0.1], [0.3], [0.2], [0.1]])
    s1 = policy.scores(KVView([first], 2, 1, None, 5, n_positions=16), 0)
    policy.planned(applied=True)
    memory = policy._past[0]
    assert memory.shape == (16, 1)
    policy.shift(1, 2)  # positions 1-2 leave, 3-5 become 1-3
    assert policy._past[0] is memory
    np.testing.assert_allclose(memory[:4, 0], s1[[0, 3, 4, 5], 0], rtol=1e-6)
    assert np.isnan(memory[4:]).all()
    later = layer([[0], [1], [2], [3], [15]], [[0.0], [0.0], [0.0], [0.0], [0.5]])
    policy.scores(KVView([later], 2, 1, None, 15, n_positions=16), 0)
    assert policy._past[0] is memory  # position 15 < the window: no new array
