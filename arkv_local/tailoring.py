"""Runs a KV policy against a context's tri-state memory: when to tailor, and what it costs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .memory import TriStateKV
from .policies import Budget, KVView, LayerView, Policy


@dataclass(frozen=True)
class LayerKVStats:
    """One layer: tokens per KV head in f16 (O), 4-bit (Q) and evicted (E), its O share."""

    n_o: int
    n_q: int
    n_e: int
    oq_ratio: float
    bytes_used: int


@dataclass(frozen=True)
class KVStats:
    """What the KV cache holds now and what managing it cost."""

    bytes_used: int        # KV bytes the pools hold now
    bytes_budget: int      # KV bytes the pools may hold
    bytes_f16: int         # what an f16 cache would hold for every position seen
    n_tokens: int          # positions seen
    layers: list[LayerKVStats]
    n_tailorings: int
    tailoring_seconds: float


class Tailor:
    """Keeps one sequence's cache within its budget: before each decode it makes room (a plan
    from the policy) when the new tokens would not fit, and it measures ARKV's prefill
    statistics on the first prompt."""

    def __init__(self, kv: TriStateKV, policy: Policy, layer_bytes: int, n_head: int) -> None:
        self.kv = kv
        self.policy = policy
        self.budget = Budget(layer_bytes, kv.slot_bytes_o, kv.slot_bytes_q, kv.cap_q)
        self.group = n_head // kv.n_head_kv
        # the most new tokens one plan can make room for; a prompt is read in chunks of half
        # that: room reserved in f16 for a chunk is budget not spent on kept (4-bit) tokens
        max_room = layer_bytes // kv.slot_bytes_o - policy.window - policy.sinks
        assert max_room >= policy.slack, "the budget was checked against the policy"
        self.max_chunk = max(policy.slack, max_room // 2)
        self.n_tailorings = 0
        self.tailoring_seconds = 0.0
        self.start_sequence()

    def start_sequence(self) -> None:
        """A new sequence: measure its prefill statistics again."""
        self.policy.reset()
        self.stats: np.ndarray | None = None
        self.ratios = np.ones(self.kv.n_layer)
        self.measuring = self.policy.needs_stats
        self.room: int | None = None  # free O slots once a submitted plan is applied

    def before_decode(self, n_tokens: int, pos_max: int) -> None:
        """Make room for n_tokens new tokens (n_tokens <= max_chunk)."""
        free = self.kv.free_slots() if self.room is None else self.room
        if free < n_tokens:
            self.tailor(n_tokens, pos_max)
        if self.measuring:
            self.kv.request_stats()  # the first prompt's last chunk before a plan keeps them

    def after_decode(self) -> None:
        self.room = None

    def end_of_prompt(self) -> None:
        if self.measuring:
            self.stats = self.kv.stats()
            self.measuring = False

    def tailor(self, room: int, pos_max: int) -> None:
        t0 = time.perf_counter()
        self.end_of_prompt()
        view = self.view(pos_max)
        plan = self.policy.plan(view, self.budget, room)
        self.kv.submit(plan)
        self.ratios = np.clip(np.asarray(self.policy.ratios(view), np.float64), 0.0, 1.0)
        self.room = min(p.cap_o - len(p.o_src) for p in plan)
        self.n_tailorings += 1
        self.tailoring_seconds += time.perf_counter() - t0

    def view(self, pos_max: int) -> KVView:
        infos = self.kv.layers()
        pos_o, pos_q = self.kv.positions()
        sc = self.kv.scores()
        layers = [
            LayerView(pos_o[i][: info.n_o], pos_q[i][: info.n_q],
                      sc.sum_o[i][: info.n_o], sc.sum_sq_o[i][: info.n_o],
                      sc.sum_q[i][: info.n_q], sc.sum_sq_q[i][: info.n_q])
            for i, info in enumerate(infos)
        ]
        return KVView(layers, sc.n_queries, self.group, self.stats, pos_max)

    def kv_stats(self, n_tokens: int) -> KVStats:
        infos = self.kv.layers()
        layers = [LayerKVStats(i.n_o, i.n_q, n_tokens - i.n_o - i.n_q, float(r), i.bytes_used)
                  for i, r in zip(infos, self.ratios, strict=True)]
        return KVStats(
            bytes_used=sum(i.bytes_used for i in infos),
            bytes_budget=sum(i.bytes_alloc for i in infos),
            bytes_f16=n_tokens * self.kv.slot_bytes_o * self.kv.n_layer,
            n_tokens=n_tokens,
            layers=layers,
            n_tailorings=self.n_tailorings,
            tailoring_seconds=self.tailoring_seconds,
        )
