"""Runs a KV policy against a context's tri-state memory: when to tailor, and what it costs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .memory import MemoryParams, TriStateKV
from .policies import Budget, KVView, LayerPlan, LayerView, Policy
from .session import Session


@dataclass(frozen=True)
class LayerKVStats:
    """One layer: tokens per KV head in f16 (O), 4-bit (Q), spilled to host memory (S) and
    evicted (E), its O share, and bytes (the budget's pools; the spill's)."""

    n_o: int
    n_q: int
    n_e: int
    oq_ratio: float
    bytes_used: int
    n_s: int = 0
    bytes_spill: int = 0


@dataclass(frozen=True)
class KVStats:
    """What the KV cache holds now and what managing it cost."""

    bytes_used: int        # KV bytes the pools hold now
    bytes_budget: int      # KV bytes the pools may hold
    bytes_f16: int         # what an f16 cache would hold for every token seen
    n_tokens: int          # tokens seen (context shifts included)
    layers: list[LayerKVStats]
    n_tailorings: int
    tailoring_seconds: float
    bytes_spill: int = 0   # host bytes of the spilled rows (outside the budget)
    n_recalls: int = 0     # prompts whose last tokens read the spilled rows
    recall_seconds: float = 0.0  # time those recall passes took, plans included
    n_shifts: int = 0      # context shifts: positions moved back to stay in the window


class Tailor:
    """Keeps one sequence's cache within its budget: before each decode it makes room (a plan
    from the policy) when the new tokens would not fit, and it measures ARKV's prefill
    statistics on the first prompt. What the policy learns lives in `session`. Plans take
    `threads` threads (llama.cpp's own wait for them)."""

    def __init__(self, kv: TriStateKV, policy: Policy, params: MemoryParams, n_head: int,
                 recall_tokens: int = 0, threads: int = 1) -> None:
        self.kv = kv
        self.threads = threads
        self.params = params
        self.session = Session(policy, kv.n_layer, {
            "kv_budget_bytes": params.budget_bytes * kv.n_layer, "kv_quant": params.quant,
            "kv_rotate": params.rotate})
        self.budget = Budget(params.budget_bytes, kv.slot_bytes_o, kv.slot_bytes_q,
                             cap_s=params.cap_s)
        self.group = n_head // kv.n_head_kv
        self.max_chunk = policy.read_chunk(self.budget.cap_o_max)
        # a prompt's last tokens that read every row, spilled ones too (all scored)
        self.recall_tokens = min(recall_tokens, self.max_chunk) if params.cap_s else 0

    @property
    def policy(self) -> Policy:
        return self.session.policy

    def start_sequence(self) -> None:
        """A new sequence (the cache was just cleared): measure its prefill statistics again,
        and give the pools the layout a new context starts with (the budget in f16, or
        n_o_init slots), so that it is read exactly as by a fresh object, not in the last
        plan's O pool, which may not even hold its first chunk."""
        self.session.start_sequence()
        cap_o = self.params.n_o_init or self.budget.cap_o_max
        if any(info.cap_o != cap_o for info in self.kv.layers()):
            none = np.zeros((0, self.kv.n_head_kv), np.int32)
            self.kv.submit([LayerPlan(cap_o, none, none, none.astype(bool))] * self.kv.n_layer)

    def before_decode(self, n_tokens: int, pos_max: int, n_next: int = 0) -> None:
        """Make room for n_tokens new tokens (n_tokens <= max_chunk); n_next: the tokens of the
        chunk the read goes on with (0: it may end here)."""
        if self.kv.free_slots() < n_tokens:  # counts a pending plan's layout
            self.tailor(n_tokens, pos_max)
        if self.session.measuring and (n_next == 0 or self.kv.free_slots() - n_tokens < n_next):
            # the first prompt's statistics are those of its last chunk before a plan or its end:
            # only that chunk pays for them
            self.kv.request_stats()

    def end_of_prompt(self) -> None:
        s = self.session
        if s.measuring:
            s.stats = self.kv.stats()
            s.measuring = False

    def spilled(self) -> bool:
        """Whether any row is in the spill (a recall pass has something to read)."""
        return any(info.n_s > 0 for info in self.kv.layers())

    def recall(self, tail: int, pos_max: int, read: Callable[[], None]) -> None:
        """Read a prompt's last `tail` tokens (read()) over every row, spilled ones included, so
        that the logits that start the answer saw them; then plan with the scores those queries
        left, which rank all rows: the policy may bring spilled rows back and spill others."""
        t0 = time.perf_counter()
        self.tailor(tail, pos_max)  # room for the tail, and scores from the tail's queries only
        self.kv.set_recall(True)
        try:
            read()
        finally:
            self.kv.set_recall(False)
        self.tailor(self.policy.slack, pos_max + tail, recall=True)
        self.session.n_recalls += 1
        self.session.recall_seconds += time.perf_counter() - t0

    def shift(self, n_keep: int, n_discard: int, dropped: list[int], pos_max: int) -> None:
        """Context shift (the window is full): positions [n_keep, n_keep + n_discard), the
        tokens `dropped`, leave the cache and later rows move back by n_discard. A plan evicts
        them first (every other row stays where it is), so that every KV head loses as many
        rows: a layer's heads hold equal counts."""
        caps_o = [info.cap_o for info in self.kv.layers()]
        self._apply(self.policy.drop_plan(self.view(pos_max), caps_o,
                                          (n_keep, n_keep + n_discard), threads=self.threads))
        self.kv.shift(n_keep, n_discard)
        self.policy.shift(n_keep, n_discard)
        self.session.n_shifts += 1
        self.session.dropped.extend(dropped)

    def cut(self, n: int, pos_max: int, exact: bool = False) -> bool:
        """Positions from n on leave the cache (a prompt that leaves the history there: an answer
        read back tokenized otherwise); the rows before stay as plans left them. Where KV heads
        hold different tokens of the tail, a plan evicts it first (as a shift's does), so that
        every head loses as many rows. `exact`: only a tail no plan has touched (the prefix is
        then what a fresh read of it holds). False: not cut, the tail is still there."""
        if n > pos_max:
            return True
        if not exact:  # (an exact cut is refused while a plan is pending, as it would be after)
            self.kv.apply()
            if not self._heads_lose_alike(n):
                caps_o = [info.cap_o for info in self.kv.layers()]
                self._apply(self.policy.drop_plan(self.view(pos_max), caps_o, (n, pos_max + 1),
                                                  threads=self.threads))
        if not self.kv.cut(n, exact):
            return False
        self.policy.shift(n, pos_max + 1 - n)  # what it remembers of the tail's positions goes
        return True

    def _heads_lose_alike(self, n: int) -> bool:
        """Whether every KV head of each layer holds as many attended (O, Q) and as many spilled
        rows at positions from n on (the memory removes a range only then)."""
        pos_o, pos_q, pos_s = self.kv.positions()
        for o, q, s in zip(pos_o, pos_q, pos_s, strict=True):
            for lost in ((o >= n).sum(0) + (q >= n).sum(0), (s >= n).sum(0)):
                if (lost != lost[0]).any():
                    return False
        return True

    def tailor(self, room: int, pos_max: int, recall: bool = False) -> None:
        """Plan with the policy and apply the plan at once (a failure raises here, naming it)."""
        t0 = time.perf_counter()
        self.end_of_prompt()
        s = self.session
        view = self.view(pos_max, recall)
        self._apply(s.policy.plan(view, self.budget, room, threads=self.threads))
        s.ratios = np.clip(np.asarray(s.policy.ratios(view), np.float64), 0.0, 1.0)
        s.n_tailorings += 1
        s.tailoring_seconds += time.perf_counter() - t0

    def _apply(self, plan: list[LayerPlan]) -> None:
        """Submit a plan and apply it at once; the policy keeps what scoring it taught only if
        it was applied (a failed one leaves the cache, and so the policy, as they were)."""
        try:
            self.kv.submit(plan)
            self.kv.apply()
        except Exception:
            self.policy.planned(applied=False)
            raise
        self.policy.planned(applied=True)

    def view(self, pos_max: int, recall: bool = False) -> KVView:
        infos = self.kv.layers()
        pos_o, pos_q, pos_s = self.kv.positions()
        sc = self.kv.scores()
        layers = [
            LayerView(pos_o[i][: info.n_o], pos_q[i][: info.n_q],
                      sc.sum_o[i][: info.n_o], sc.sum_sq_o[i][: info.n_o],
                      sc.sum_q[i][: info.n_q], sc.sum_sq_q[i][: info.n_q],
                      pos_s[i][: info.n_s], sc.sum_s[i][: info.n_s], sc.sum_sq_s[i][: info.n_s])
            for i, info in enumerate(infos)
        ]
        return KVView(layers, sc.n_queries, self.group, self.session.stats, pos_max, recall,
                      self.kv.n_ctx)

    def kv_stats(self, n_positions: int) -> KVStats:
        """Counts for a cache whose positions run to n_positions (plus what shifts dropped)."""
        n_tokens = n_positions + len(self.session.dropped)
        infos = self.kv.layers()
        layers = [LayerKVStats(i.n_o, i.n_q, n_tokens - i.n_o - i.n_q - i.n_s, float(r),
                               i.bytes_used, i.n_s, i.bytes_spill)
                  for i, r in zip(infos, self.session.ratios, strict=True)]
        return KVStats(
            bytes_used=sum(i.bytes_used for i in infos),
            bytes_budget=sum(i.bytes_alloc for i in infos),
            bytes_f16=n_tokens * self.kv.slot_bytes_o * self.kv.n_layer,
            n_tokens=n_tokens,
            layers=layers,
            n_tailorings=self.session.n_tailorings,
            tailoring_seconds=self.session.tailoring_seconds,
            bytes_spill=sum(i.bytes_spill for i in infos),
            n_recalls=self.session.n_recalls,
            recall_seconds=self.session.recall_seconds,
            n_shifts=self.session.n_shifts,
        )
