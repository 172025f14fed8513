"""Policy base class: what a KV policy decides, on top of the shared planner.

A policy says two things: per layer, the share of the non-window budget kept in f16 (`ratios`),
and per cached token, how important it is (`scores`). The planner (planner.py) does the rest
the same way for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import defaults
from .planner import plan_layer
from .types import Budget, KVView, LayerPlan, LayerView

__all__ = ["Budget", "KVView", "LayerPlan", "LayerView", "Policy"]


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

    def scores(self, view: KVView, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Importance of each O and Q slot in use, shaped as pos_o and pos_q; higher is kept."""
        raise NotImplementedError

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
            plans.append(plan_layer(lv, score_o, score_q, ratios[i], budget, room, view.pos_max,
                                    window=self.window, sinks=self.sinks,
                                    quantize=self.quantize, layer=i))
        return plans
