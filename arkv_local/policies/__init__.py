"""KV policies: which cached token stays f16, goes to 4 bits, or is evicted.

A new policy is a small subclass of `Policy` overriding `scores` (and `ratios` to use Q).
Numpy only: policies import and run without the native library.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .arkv import ARKV, TAU_INSTRUCT, TAU_TUNED
from .base import Policy
from .baselines import H2O, Quant, Window
from .heavy_hitter import HeavyHitter
from .types import Budget, KVView, LayerPlan, LayerView

POLICIES: dict[str, type[Policy]] = {"arkv": ARKV, "h2o": H2O, "window": Window, "quant": Quant}
KV_POLICIES = ("full", *POLICIES)  # "full": llama.cpp's own f16 cache


def make_policy(policy: str | Policy, **knobs: Any) -> Policy | None:
    """The policy named (with its knobs; None values mean the default), or None for "full"."""
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if isinstance(policy, Policy):
        if knobs:
            raise ValueError(f"set {', '.join(knobs)} on the Policy instance itself")
        return policy
    if policy == "full":
        if knobs:
            raise ValueError(f"{', '.join(knobs)} need a kv_policy other than 'full'")
        return None
    cls = POLICIES.get(policy) if isinstance(policy, str) else None
    if cls is None:
        raise ValueError(f"unknown kv_policy {policy!r}: choose one of {', '.join(KV_POLICIES)}"
                         " or pass a Policy instance")
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(knobs) - fields):
        raise ValueError(f"kv_policy {policy!r} has no knob {', '.join(unknown)}")
    return cls(**knobs)

__all__ = [
    "ARKV", "H2O", "KV_POLICIES", "POLICIES", "TAU_INSTRUCT", "TAU_TUNED", "Budget",
    "HeavyHitter", "KVView", "LayerPlan", "LayerView", "Policy", "Quant", "Window", "make_policy",
]
