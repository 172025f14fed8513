"""One sequence's Python side of a KV policy, and its snapshot as plain data.

llama.cpp's state holds the cache; what the policy decides with (prefill statistics, per-layer
O shares, its own memory, whether it still measures) and the counters live here, so that
save_state/load_state, the prompt caches and arkv-chat's /save carry both.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .policies import Policy
from .policies.types import array_from_data, array_to_data

FORMAT = "arkv_local.session"
VERSION = 1


@dataclass
class Session:
    """The policy of one sequence and what it learnt; snapshot() / restore() as JSON-able data."""

    policy: Policy
    n_layer: int
    # what the cache's rows depend on, by the knob that sets it (kv_budget_bytes, kv_quant,
    # kv_rotate): a state is loaded only into a cache made alike
    memory: dict[str, Any] = field(default_factory=dict)
    stats: np.ndarray | None = field(default=None, init=False)  # (n_layer, 3), once measured
    ratios: np.ndarray = field(init=False)  # per layer, the O share of the last plan
    measuring: bool = field(init=False)     # the first prompt's statistics are still to come
    n_tailorings: int = field(default=0, init=False)
    tailoring_seconds: float = field(default=0.0, init=False)
    n_recalls: int = field(default=0, init=False)  # prompts whose tail read the spilled rows
    recall_seconds: float = field(default=0.0, init=False)
    n_shifts: int = field(default=0, init=False)  # context shifts (positions past the window)
    # the tokens context shifts took out of the window, in order: the sequence's history is
    # the cache's first n_keep tokens, these, then the rest of the cache's tokens (4 bytes a
    # token: an endless chat keeps them all)
    dropped: array = field(default_factory=lambda: array("i"), init=False)

    def __post_init__(self) -> None:
        self.start_sequence()

    def start_sequence(self) -> None:
        """A new sequence: the policy forgets, the statistics are measured again."""
        self.policy.reset()
        self.stats = None
        self.ratios = np.ones(self.n_layer)
        self.measuring = self.policy.needs_stats
        self.dropped = array("i")

    def snapshot(self) -> dict[str, Any]:
        """Everything above as plain data (json.dumps-able; arrays bit for bit)."""
        return {
            "format": FORMAT, "version": VERSION, "policy": self.policy.name,
            "n_layer": self.n_layer, "memory": self.memory,
            "stats": None if self.stats is None else array_to_data(self.stats),
            "ratios": array_to_data(self.ratios), "measuring": self.measuring,
            "n_tailorings": self.n_tailorings,
            "tailoring_seconds": self.tailoring_seconds,
            "n_recalls": self.n_recalls, "recall_seconds": self.recall_seconds,
            "n_shifts": self.n_shifts, "dropped": list(self.dropped),
            "policy_state": self.policy.snapshot(),
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Take back a snapshot of this policy and model; ValueError before any change."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a snapshot of an arkv_local session")
        if data.get("version") != VERSION:
            raise ValueError(f"session snapshot version {data.get('version')!r}: this "
                             f"arkv_local reads version {VERSION}")
        if data["policy"] != self.policy.name or data["n_layer"] != self.n_layer:
            raise ValueError(
                f"the state was saved under kv_policy {data['policy']!r} with {data['n_layer']} "
                f"layers, not kv_policy {self.policy.name!r} with {self.n_layer}")
        for knob, value in data.get("memory", {}).items():  # (older snapshots have none)
            if self.memory.get(knob) != value:
                raise ValueError(f"the state was saved with {knob}={value!r}, this Llama has "
                                 f"{knob}={self.memory.get(knob)!r}: load it into one made alike")
        stats = None if data["stats"] is None else array_from_data(data["stats"])
        ratios = array_from_data(data["ratios"])
        if ratios.shape != (self.n_layer,) or (stats is not None and
                                               stats.shape != (self.n_layer, 3)):
            raise ValueError("the session snapshot's arrays do not match the model's layers")
        counters = (int(data["n_tailorings"]), float(data["tailoring_seconds"]),
                    int(data.get("n_recalls", 0)), float(data.get("recall_seconds", 0.0)))
        measuring = bool(data["measuring"])
        n_shifts = int(data.get("n_shifts", 0))
        dropped = array("i", [int(t) for t in data.get("dropped", [])])
        self.policy.restore(data["policy_state"])  # raises before it changes anything
        self.stats, self.ratios, self.measuring = stats, ratios, measuring
        (self.n_tailorings, self.tailoring_seconds,
         self.n_recalls, self.recall_seconds) = counters
        self.n_shifts, self.dropped = n_shifts, dropped
