"""Policy base class: what a KV policy decides, on top of the shared planner.

A policy says two things: per layer, the share of the non-window budget kept in f16 (`ratios`),
and per cached row (O, Q and spilled), how important it is (`scores`). The planner
(planner.py) does the rest the same way for every policy.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import defaults
from .planner import drop_rows, plan_layer
from .scores import heavy_hitter, share_of_max, spread_by_position, token_peaks
from .types import Budget, KVView, LayerPlan, LayerView


def is_real(x: object) -> bool:
    """A real number, not a bool and not NaN: what a policy's numeric knobs must be."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x == x


__all__ = ["Budget", "KVView", "LayerPlan", "LayerView", "Policy"]

RECALL_GAMMA = 0.8  # the variance's weight in recall scores: heavy_hitter.GAMMA's value
RECALL_SPAN = 15   # tokens around an attended one that come back with it (a number, a name)
# a token's peak is shared by every head from this share of the sharpest look on: only the few
# tokens some head singled out, the rest stays each head's own ranking (docs/BENCHMARKS.md)
RECALL_PEAK = 0.5


@dataclass
class Policy:
    """Base class of KV policies (see the module docstring).

    window: newest tokens always kept in f16 and never scored; sinks: first tokens always kept
    in f16 (4, as StreamingLLM: without them a policy that evicts old tokens loses the
    attention sink once the budget is full); slack: slots freed for new tokens at each
    tailoring, so that it does not run on every token.
    """

    window: int = defaults.WINDOW
    sinks: int = defaults.SINKS
    slack: int = defaults.SLACK

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

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        """Importance of every row in use, shaped as the layer's `pos` (O, then Q, then spilled
        rows); higher is kept. The planner compares them in float32: equal ones go to the newer
        token. Layers are scored at once, from plan()'s threads: what a layer's scoring
        changes belongs to that layer (prepare() sets up what they share)."""
        raise NotImplementedError

    def recall_scores(self, view: KVView, layer: int) -> np.ndarray:
        """After a recall pass (view.recall): the importance of every row, spilled ones included,
        to the prompt's last tokens, whose attention covered them all. Default, for every
        policy: the row's heavy-hitter score in its head, as a share of the head's largest among
        the rows a plan may move, plus its token's peak (view.peaks: the sharpest look any head
        gave it, as a share of the sharpest) where that is at least RECALL_PEAK, each spread
        over the RECALL_SPAN tokens around it (what the question attends to comes back with its
        span, whatever the policy ranks by while decoding). The peak is shared because few heads
        retrieve: a token that one of them singles out comes back in every head, where each
        head's own ranking would keep it only where it ranks near the top (docs/BENCHMARKS.md,
        "Recall by shared peaks")."""
        lv = view.layers[layer]
        hh = heavy_hitter(lv.mass, lv.mass_sq, view.n_queries * view.group, RECALL_GAMMA)
        peaks = view.peaks
        if peaks is None:  # a view not made by plan()
            peaks = token_peaks(view.layers, view.pos_max, self.sinks, self.window)
        own = spread_by_position(hh, lv.pos, RECALL_SPAN)
        movable = (lv.pos >= self.sinks) & (lv.pos <= view.pos_max - self.window)
        shared = peaks[lv.pos]
        shared[shared < RECALL_PEAK] = 0.0
        return share_of_max(own, movable) + spread_by_position(shared, lv.pos, RECALL_SPAN)

    def prepare(self, view: KVView) -> None:
        """Before a view's layers are scored (at once): set up what they share."""

    def shift(self, n_keep: int, n_discard: int) -> None:
        """A context shift: positions [n_keep, n_keep + n_discard) left the cache and later ones
        moved back by n_discard; a policy that remembers by position follows them."""

    def planned(self, applied: bool) -> None:
        """The plans computed since the last call were applied to the cache (True), or failed
        and left it as it was (False): what scoring them taught the policy stays or goes."""

    # what a policy remembers between tailorings (override both, with reset(), to keep more)

    def snapshot(self) -> dict[str, Any]:
        """What the policy learnt about the sequence, as JSON-able data (types.array_to_data)."""
        return {}

    def restore(self, data: dict[str, Any]) -> None:
        """Take back what snapshot() returned; raise ValueError before changing anything."""

    # mechanics shared by all policies

    def min_budget_tokens(self) -> int:
        """The smallest budget (in f16 tokens per layer) a plan fits in: window, sinks, slack."""
        return self.window + self.sinks + self.slack

    def read_chunk(self, budget_tokens: int) -> int:
        """The most tokens a prompt is read in at once with a budget of budget_tokens f16
        tokens per layer: half of what one plan can make room for (room reserved in f16 for a
        chunk is budget not spent on kept 4-bit tokens)."""
        max_room = budget_tokens - self.window - self.sinks
        assert max_room >= self.slack, "the budget was checked against the policy"
        return max(self.slack, max_room // 2)

    def plan(self, view: KVView, budget: Budget, room: int, *,
             threads: int = 1) -> list[LayerPlan]:
        """A plan that leaves at least `room` free O slots in every layer. Layers are scored and
        planned on `threads` threads (numpy's passes over a layer's rows release the GIL); the
        plan is the same for any count."""
        room = max(room, self.slack)
        if view.recall and view.peaks is None:  # shared by every layer's recall scores
            view = dataclasses.replace(view, peaks=token_peaks(view.layers, view.pos_max,
                                                               self.sinks, self.window))
        ratios = np.clip(np.asarray(self.ratios(view), np.float64), 0.0, 1.0)
        if ratios.shape != (len(view.layers),) or not np.isfinite(ratios).all():
            raise ValueError(f"{self.name}: ratios must be {len(view.layers)} finite numbers")

        def layer(i: int) -> LayerPlan:
            return plan_layer(view.layers[i], self._scores(view, i), ratios[i], budget, room,
                              view.pos_max, window=self.window, sinks=self.sinks,
                              quantize=self.quantize, cap_s=budget.cap_s, layer=i)

        return self._each_layer(layer, view, threads)

    def drop_plan(self, view: KVView, caps_o: list[int], drop: tuple[int, int], *,
                  threads: int = 1) -> list[LayerPlan]:
        """A context shift's plan: the rows at positions in `drop` = [p0, p1) leave, the others
        stay where they are (layer i's O pool keeps caps_o[i] slots)."""

        def layer(i: int) -> LayerPlan:
            return drop_rows(view.layers[i], self._scores(view, i), caps_o[i], drop,
                             view.pos_max, window=self.window, sinks=self.sinks)

        return self._each_layer(layer, view, threads)

    def _each_layer(self, plan: Callable[[int], LayerPlan], view: KVView,
                    threads: int) -> list[LayerPlan]:
        """plan(i) for every layer of the view, in order, on up to `threads` threads."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.prepare(view)
        n = len(view.layers)
        rows = max((sum(lv.n_rows) * lv.pos_o.shape[1] for lv in view.layers), default=0)
        threads = min(threads, n) if rows >= _ROWS_PER_THREAD else 1
        if threads == 1:
            return [plan(i) for i in range(n)]
        return list(_executor(threads, os.getpid()).map(plan, range(n)))

    def _scores(self, view: KVView, layer: int) -> np.ndarray:
        lv = view.layers[layer]
        score = np.asarray((self.recall_scores if view.recall else self.scores)(view, layer))
        if score.shape != lv.pos.shape:
            raise ValueError(f"{self.name}: scores of layer {layer} must be shaped as its rows "
                             f"{lv.pos.shape} (O, Q, then spilled), got {score.shape}")
        return score


# layers of more (row, head) entries than this are worth a thread (bench plans on two cores:
# break-even near 20k at SmolLM2's shape, 1.15x at 25k, 1.5x at 50k); below it a layer's plan is
# mostly Python (the GIL held), and threads only take turns
_ROWS_PER_THREAD = 1 << 15


@functools.cache
def _executor(threads: int, pid: int) -> ThreadPoolExecutor:
    """Plan threads, made once per count (and per process: a forked child has none running)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="arkv-plan")
