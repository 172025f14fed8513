"""Policy math on small hand-checked cases: OQ ratios, heavy hitters, smoothing, plans."""

from __future__ import annotations

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
from arkv_local.policies.scores import heavy_hitter, oq_ratios, smooth_by_position


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


def layer(pos_o: list[list[int]], mass_o: list[list[float]], pos_q: list[list[int]] | None = None,
          mass_q: list[list[float]] | None = None) -> LayerView:
    po, mo = np.array(pos_o), np.array(mass_o, float)
    pq = np.array(pos_q if pos_q else np.zeros((0, po.shape[1])), int)
    mq = np.array(mass_q if mass_q else np.zeros((0, po.shape[1])), float)
    return LayerView(po, pq, mo, mo**2, mq, mq**2)


# costs: an O slot 10 bytes, a Q slot 3; cap_q(cap_o) as if the arena had room for all
BUDGET = Budget(layer_bytes=100, slot_o=10, slot_q=3, cap_q=lambda cap_o: 100)


class ByMass(Policy):
    """Importance = the attention mass as given (no smoothing), for exact expectations."""

    def scores(self, view: KVView, i: int) -> tuple[np.ndarray, np.ndarray]:
        return view.layers[i].mass_o, view.layers[i].mass_q


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
    # head 0 keeps positions 1, 3, 5 (mass .8, .9, .5); head 1 keeps 0, 4, 5 (.9, .8, .7)
    assert plan.o_src[:, 0].tolist() == [1, 3, 5, 6, 7]
    assert plan.o_src[:, 1].tolist() == [0, 4, 5, 6, 7]
    # the other 3 tokens of each head fit in Q (13 slots), in position order, from O
    assert plan.q_src[:, 0].tolist() == [0, 2, 4] and plan.q_src[:, 1].tolist() == [1, 2, 3]
    assert plan.q_from_o.all()


def test_plan_evicts_what_the_bytes_do_not_buy() -> None:
    # budget 60: window 2 + room 1 = 30 bytes, 30 left; ratio 1 -> 3 O slots, no Q bytes left
    pos = [[p] for p in range(8)]
    mass = [[0.1], [0.8], [0.3], [0.9], [0.2], [0.5], [0.0], [0.0]]
    view = KVView([layer(pos, mass)], 4, 1, None, 7)
    budget = Budget(60, 10, 3, lambda cap_o: 100)
    (plan,) = ByMass(window=2, sinks=0, slack=1).plan(view, budget, room=1)
    assert plan.o_src[:, 0].tolist() == [1, 3, 5, 6, 7]
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
    (plan,) = Half(window=2, sinks=0, slack=1).plan(view, Budget(50, 10, 3, lambda c: 100),
                                                    room=1)
    assert plan.o_src[:, 0].tolist() == [0, 2, 3]  # O slots 0, 2, 3 = positions 1, 3, 4
    assert plan.q_src[:, 0].tolist() == [0, 1] and plan.q_from_o[:, 0].tolist() == [False, True]


def test_sinks_stay_in_o() -> None:
    pos = [[p] for p in range(10)]
    mass = [[0.0]] * 10
    view = KVView([layer(pos, mass)], 4, 1, None, 9)
    budget = Budget(70, 10, 3, lambda cap_o: 0)
    (plan,) = Window(window=2, sinks=2, slack=1).plan(view, budget, room=1)
    # 70 bytes: sinks 2 + window 2 + room 1 = 50, 20 left -> 2 more O slots, the newest
    assert plan.o_src[:, 0].tolist() == [0, 1, 6, 7, 8, 9]


def test_budget_below_window_and_room_is_named() -> None:
    view = KVView([layer([[p] for p in range(8)], [[0.0]] * 8)], 4, 1, None, 7)
    with pytest.raises(ValueError, match="cannot hold the window and sinks"):
        ByMass(window=6, slack=5).plan(view, BUDGET, room=5)


def test_baselines_use_their_states() -> None:
    view = KVView([layer([[p] for p in range(40)], [[1.0 / (p + 1)] for p in range(40)])],
                  4, 1, np.array([[1.0, 1.0, 1.0]]), 39)
    budget = Budget(200, 10, 3, lambda cap_o: 100)
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
    s1, _ = policy.scores(KVView([first], 2, 1, None, 3), 0)
    np.testing.assert_allclose(s1[:, 0], hh(first))  # nothing to remember yet
    s2, _ = policy.scores(KVView([second], 2, 1, None, 5), 0)
    want = hh(second)
    want[:3] = 0.25 * hh(first)[1:] + 0.75 * want[:3]  # positions 1-3 were scored before
    np.testing.assert_allclose(s2[:, 0], want)
    policy.reset()  # a new sequence forgets
    s3, _ = policy.scores(KVView([second], 2, 1, None, 5), 0)
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
