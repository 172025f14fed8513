"""What a policy sees and returns, and the budget's arithmetic: numpy only, no native library,
so that a policy can be written and tested without the built llama.cpp."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

Q_ALIGN = 64  # bytes: in each arena the Q pool starts at this alignment after the O pool

# where a row is, or comes from in a plan (enum llama_arkv_pool)
POOL_Q, POOL_O, POOL_S = 0, 1, 2



def _none() -> np.ndarray:
    return np.zeros((0, 0), np.int32)


@dataclass(frozen=True)
class LayerView:
    """One layer as a policy sees it; arrays are (slots in use, n_head_kv). The spilled rows
    (S: 4-bit, in host memory, outside the budget) only gain mass in recall passes."""

    pos_o: np.ndarray   # positions in the O slots
    pos_q: np.ndarray   # positions in the Q slots
    mass_o: np.ndarray  # attention mass per slot since the last plan (summed over queries
    mass_sq_o: np.ndarray  # and over the GQA group), and squared mass
    mass_q: np.ndarray
    mass_sq_q: np.ndarray
    pos_s: np.ndarray = field(default_factory=_none)  # positions in the spilled slots
    mass_s: np.ndarray = field(default_factory=_none)
    mass_sq_s: np.ndarray = field(default_factory=_none)

    def _rows(self, o: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
        s = s.reshape(0, o.shape[1]) if s.size == 0 else s
        return np.concatenate([o, q, s])

    # made once per view: the scores and the planner read them several times

    @cached_property
    def pos(self) -> np.ndarray:
        """Positions of all rows, O then Q then S: the rows a policy scores."""
        return self._rows(self.pos_o, self.pos_q, self.pos_s)

    @cached_property
    def mass(self) -> np.ndarray:
        return self._rows(self.mass_o, self.mass_q, self.mass_s)

    @cached_property
    def mass_sq(self) -> np.ndarray:
        return self._rows(self.mass_sq_o, self.mass_sq_q, self.mass_sq_s)

    @property
    def n_rows(self) -> tuple[int, int, int]:
        """Rows per head in O, Q and S."""
        return len(self.pos_o), len(self.pos_q), len(self.pos_s)


@dataclass(frozen=True)
class KVView:
    """What the memory holds now, for a policy to decide on."""

    layers: list[LayerView]
    n_queries: int           # queries accumulated since the last plan
    group: int               # query heads per KV head (GQA)
    stats: np.ndarray | None  # (n_layer, 3): entropy, variance, kurtosis of the first prefill
    pos_max: int             # newest position
    recall: bool = False     # the scores are a prompt's tail attending to every row (spilled too)
    n_positions: int = 0     # positions stay below this (the context window); 0: not known
    # recall views: per position 0..pos_max, the sharpest look any head gave it
    # (scores.token_peaks; Policy.plan fills it in)
    peaks: np.ndarray | None = None


@dataclass(frozen=True)
class LayerPlan:
    """One layer's next layout: row i of o_src (n_o, n_head_kv) names, per head, the current slot
    that new O slot i takes, in the pool o_from names (POOL_O when None); q_src/q_from the same
    for the Q slots (a row from O is quantized now) and s_src/s_from for the spilled slots. A row
    that no new slot takes is evicted; one left in its slot is not moved."""

    cap_o: int
    o_src: np.ndarray
    q_src: np.ndarray
    q_from: np.ndarray
    s_src: np.ndarray = field(default_factory=_none)
    s_from: np.ndarray = field(default_factory=_none)
    o_from: np.ndarray | None = None

    @property
    def free_o(self) -> int:
        """O slots left for new tokens once the plan is applied."""
        return self.cap_o - len(self.o_src)


@dataclass(frozen=True)
class Budget:
    """One layer's K+V bytes and what a slot (K and V, all KV heads) costs in O and in Q, and
    the spilled slots beside them.

    The memory splits the bytes into two arenas, K and V, each holding the O pool then, from
    the next `align`-byte boundary, the Q pool: cap_q(cap_o) is the Q room a layout leaves,
    as the C++ memory computes it (llama_kv_cache_arkv::cap_q_for)."""

    layer_bytes: int
    slot_o: int
    slot_q: int
    align: int = Q_ALIGN
    cap_s: int = 0  # spilled slots per layer, in host memory outside the budget (0: evict)

    @property
    def cap_o_max(self) -> int:
        """O slots when the whole budget is f16."""
        return self.layer_bytes // self.slot_o

    def cap_q(self, cap_o: int) -> int:
        """Q slots left in each arena after an O pool of cap_o slots."""
        arena = self.layer_bytes // 2
        off = (cap_o * (self.slot_o // 2) + self.align - 1) // self.align * self.align
        return 0 if off >= arena else 2 * (arena - off) // self.slot_q  # a Q row: slot_q / 2


def array_to_data(a: np.ndarray) -> dict[str, Any]:
    """An array as JSON-able data, bit for bit (NaN included)."""
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def array_from_data(d: dict[str, Any]) -> np.ndarray:
    """The array array_to_data wrote; numeric dtypes only (never objects)."""
    dtype = np.dtype(d["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"not a numeric array type: {d['dtype']!r}")
    raw = base64.b64decode(d["data"], validate=True)
    return np.frombuffer(raw, dtype).reshape(d["shape"]).copy()
