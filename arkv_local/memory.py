"""Python view of a context's tri-state KV memory: numpy statistics out, plans in.

The mechanism lives in C++ (arkv_local/csrc); this module only moves arrays across ctypes,
so that policies never touch ctypes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import arkv_cpp, defaults
from .policies.types import POOL_O, LayerPlan

QUANT_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # ggml_type values
QUANT_BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q8_0": (32, 34)}  # values, bytes per block
# how a decoded token attends over a layer with Q rows (enum llama_arkv_attn): "auto" takes the
# fused kernel (one pass over Q and O rows) for host pools and for device pools whose backend
# runs it (CUDA), else "segments" (flash attention over Q rows as they lie, and over O rows,
# merged exactly); "dequant" dequantizes Q rows to f16 for llama.cpp's attention
ATTN_PATHS = {"auto": 0, "dequant": 1, "segments": 2}


@dataclass(frozen=True)
class MemoryParams:
    """What the memory is created with (llama_arkv_params)."""

    budget_bytes: int  # K+V bytes per layer
    n_o_init: int = defaults.N_O_INIT  # O slots per layer at creation; 0: the budget in f16
    quant: str = defaults.QUANT
    rotate: bool = defaults.ROTATE
    n_score_queries: int = defaults.OBSERVE
    attn: str = defaults.ATTN  # decode attention path, one of ATTN_PATHS
    cap_s: int = 0  # spilled slots per layer (4-bit rows in host memory); 0: evicted rows are gone
    spill_dir: str | None = None  # the spilled rows in a memory-mapped file there (None: in RAM)

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.quant not in QUANT_TYPES:
            raise ValueError(
                f"unknown quant type {self.quant!r}: choose one of {', '.join(QUANT_TYPES)}"
            )
        if self.attn not in ATTN_PATHS:
            raise ValueError(
                f"unknown attention path {self.attn!r}: choose one of {', '.join(ATTN_PATHS)}"
            )
        if self.n_o_init < 0 or self.n_score_queries < 0 or self.cap_s < 0:
            raise ValueError("n_o_init, n_score_queries and cap_s must be >= 0")

    def arm(self) -> None:
        """Make the next llama context created use this memory."""
        p = arkv_cpp.llama_arkv_params(
            self.budget_bytes,
            self.n_o_init,
            QUANT_TYPES[self.quant],
            self.rotate,
            self.n_score_queries,
            ATTN_PATHS[self.attn],
            self.cap_s,
            None if self.spill_dir is None else os.fsencode(self.spill_dir),
        )
        arkv_cpp.llama_arkv_arm(ctypes.byref(p))  # the context copies what it needs when created


def quant_slot_bytes(quant: str, n_embd_gqa: int) -> int:
    """K+V bytes one token costs in one layer's Q (or spilled) pool."""
    values, size = QUANT_BLOCKS[quant]
    return 2 * n_embd_gqa // values * size


def disarm() -> None:
    arkv_cpp.llama_arkv_arm(None)


def last_error() -> str:
    """Why the last call into the tri-state memory failed (also a refused model)."""
    return arkv_cpp.llama_arkv_last_error().decode()


@contextmanager
def armed(params: MemoryParams) -> Iterator[None]:
    """Within the block, the llama context created uses the tri-state memory; a model or
    setting it cannot serve raises ValueError with the reason."""
    params.arm()
    try:
        yield
    except ValueError as e:
        reason = last_error()
        if not reason:
            raise
        raise ValueError(f"cannot use the tri-state KV memory: {reason}") from e
    finally:
        disarm()


def open_llama(model_path: str, params: MemoryParams, **kwargs: object) -> llama_cpp.Llama:
    """A plain llama_cpp.Llama whose context uses the tri-state memory (no policy)."""
    with armed(params):
        return llama_cpp.Llama(model_path, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LayerInfo:
    """One layer's pools: capacities and slots in use (equal in every KV head), and bytes
    (bytes_alloc and bytes_used: the budget's pools; the spilled rows lie outside)."""

    cap_o: int
    cap_q: int
    n_o: int
    n_q: int
    bytes_alloc: int
    bytes_used: int
    cap_s: int = 0
    n_s: int = 0
    bytes_spill: int = 0  # K+V bytes of the spilled rows, in host memory


@dataclass(frozen=True)
class PoolExtent:
    """Bytes: where a layer's O and Q pools lie in its arena, the arena's allocated size, and
    whether the pools are views of it (a backend never pads or initializes a view)."""

    o_offset: int
    o_bytes: int
    q_offset: int
    q_bytes: int
    arena_bytes: int
    views: bool


@dataclass(frozen=True)
class Scores:
    """Attention mass per slot since the last plan, summed over `n_queries` queries, each
    summed over its GQA group; per layer arrays shaped (cap, n_head_kv)."""

    n_queries: int
    sum_o: list[np.ndarray]
    sum_sq_o: list[np.ndarray]
    sum_q: list[np.ndarray]
    sum_sq_q: list[np.ndarray]
    sum_s: list[np.ndarray]
    sum_sq_s: list[np.ndarray]


class TriStateKV:
    """The tri-state KV memory of one llama context (a `llama_context *` as int)."""

    def __init__(self, ctx: int) -> None:
        self.ctx = ctx
        self.n_layer = arkv_cpp.llama_arkv_n_layer(ctx)
        if self.n_layer < 0:
            raise ValueError("this llama context's KV memory is not the tri-state (ARKV) memory")
        self.n_head_kv = arkv_cpp.llama_arkv_n_head_kv(ctx)
        self.head_dim = arkv_cpp.llama_arkv_head_dim(ctx)
        self.slot_bytes_o = arkv_cpp.llama_arkv_slot_bytes(ctx, False)
        self.slot_bytes_q = arkv_cpp.llama_arkv_slot_bytes(ctx, True)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)  # positions stay below it (context shifts)
        # ctypes array types, made once: ctypes keeps them only while an instance lives, and
        # each new one is a reference cycle left to Python's collector
        self._infos = arkv_cpp.llama_arkv_layer_info * self.n_layer
        self._plans = arkv_cpp.llama_arkv_layer_plan * self.n_layer

    def layers(self) -> list[LayerInfo]:
        out = self._infos()
        arkv_cpp.llama_arkv_get_layers(self.ctx, out)
        return [LayerInfo(i.cap_o, i.cap_q, i.n_o, i.n_q, i.bytes_alloc, i.bytes_used,
                          i.cap_s, i.n_s, i.bytes_spill) for i in out]

    def pool_extent(self, layer: int) -> PoolExtent:
        """Where a layer's K pools lie in its arena (V's are alike)."""
        out = (ctypes.c_uint64 * 6)()
        if not arkv_cpp.llama_arkv_get_pool_extent(self.ctx, layer, out):
            raise IndexError(f"no layer {layer} (the memory has {self.n_layer})")
        return PoolExtent(*out[:5], views=bool(out[5]))

    def cap_q(self, cap_o: int) -> int:
        """Q slots a layer's budget leaves when its O pool has cap_o slots."""
        return arkv_cpp.llama_arkv_cap_q(self.ctx, cap_o)

    def free_slots(self) -> int:
        """Tokens that can be decoded before a plan must free O slots."""
        return arkv_cpp.llama_arkv_free_slots(self.ctx)

    def _split(self, flat: np.ndarray, infos: list[LayerInfo], pool: str) -> list[np.ndarray]:
        sizes = [getattr(i, f"cap_{pool}") * self.n_head_kv for i in infos]
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return [p.reshape(-1, self.n_head_kv) for p in parts]

    def _buffers(self, infos: list[LayerInfo], dtype: type) -> list[np.ndarray]:
        """One flat buffer per pool (O, Q, S), for all layers' slots."""
        return [np.zeros(sum(getattr(i, f"cap_{p}") for i in infos) * self.n_head_kv, dtype)
                for p in "oqs"]

    def positions(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Per layer, the position held by each (slot, head) of O, of Q and of S; -1 where
        free."""
        infos = self.layers()
        bufs = self._buffers(infos, np.int32)
        arkv_cpp.llama_arkv_get_positions(self.ctx, *(_ptr(b, ctypes.c_int32) for b in bufs))
        o, q, s = (self._split(b, infos, p) for b, p in zip(bufs, "oqs", strict=True))
        return o, q, s

    def scores(self) -> Scores:
        infos = self.layers()
        sums, sqs = self._buffers(infos, np.float32), self._buffers(infos, np.float32)
        f = ctypes.c_float
        n = arkv_cpp.llama_arkv_get_scores(
            self.ctx, _ptr(sums[0], f), _ptr(sqs[0], f), _ptr(sums[1], f), _ptr(sqs[1], f),
            _ptr(sums[2], f), _ptr(sqs[2], f),
        )
        (m_o, m_q, m_s), (sq_o, sq_q, sq_s) = (
            [self._split(b, infos, p) for b, p in zip(x, "oqs", strict=True)] for x in (sums, sqs))
        return Scores(n, m_o, sq_o, m_q, sq_q, m_s, sq_s)

    def apply(self) -> None:
        """Apply what is pending now (else it is applied before the next decode): rows that
        llama_memory_seq_rm removed, the K rotation that llama_memory_seq_add owes to the rows it
        shifted, then the plan. A state can be saved only once they are applied."""
        if arkv_cpp.llama_arkv_apply_plan(self.ctx) < 0:
            raise RuntimeError(f"the pending update failed: {last_error()}")

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Context shift, as llama.cpp's: positions [n_keep, n_keep + n_discard) leave the
        cache and every later row moves back by n_discard (its key re-roped), at once."""
        mem = llama_cpp.llama_get_memory(self.ctx)
        self.apply()
        if not llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard):
            raise RuntimeError(f"the context shift could not remove positions {n_keep} to "
                               f"{n_keep + n_discard - 1}: {last_error() or 'refused'}")
        llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, -1, -n_discard)
        self.apply()

    def cut(self, p0: int, exact: bool = False) -> bool:
        """Positions from p0 on leave the cache; False, nothing changed, where KV heads would
        keep different numbers of rows or a plan is pending (last_error says). `exact`: only a
        tail no plan has touched (llama_memory_seq_rm: the prefix left is then what a fresh read
        of it holds)."""
        if exact:
            mem = llama_cpp.llama_get_memory(self.ctx)
            return bool(llama_cpp.llama_memory_seq_rm(mem, 0, p0, -1))
        return bool(arkv_cpp.llama_arkv_cut_tail(self.ctx, p0))

    def set_recall(self, on: bool) -> None:
        """While on, every ubatch also attends over (and scores) the spilled rows."""
        arkv_cpp.llama_arkv_set_recall(self.ctx, on)

    def set_prompt(self, on: bool) -> None:
        """While on, small ubatches are read as a prompt's (llama.cpp's attention, not the fused
        decode kernel): a prompt's logits do not depend on how much of it was cached."""
        arkv_cpp.llama_arkv_set_prompt(self.ctx, on)

    def request_stats(self) -> None:
        """Measure ARKV's prefill statistics on the last ubatch of the next decode."""
        arkv_cpp.llama_arkv_request_stats(self.ctx)

    def stats(self) -> np.ndarray | None:
        """Per layer (entropy, variance, kurtosis) of the observation window's attention to
        the keys before it, shape (n_layer, 3); None if not measured since the request."""
        out = np.zeros((self.n_layer, 3), np.float32)
        return out if arkv_cpp.llama_arkv_get_stats(self.ctx, _ptr(out, ctypes.c_float)) else None

    def submit(self, plan: list[LayerPlan]) -> None:
        """Queue a plan (one entry per layer); it is applied before the next decode.
        Raises ValueError naming the problem, before anything changes."""
        if len(plan) != self.n_layer:
            raise ValueError(f"a plan needs one entry per layer ({self.n_layer}), got {len(plan)}")
        keep = []
        structs = self._plans()
        H = self.n_head_kv
        for s, p in zip(structs, plan, strict=True):
            o_from = np.full_like(p.o_src, POOL_O) if p.o_from is None else p.o_from
            rows = {}
            for name, src, frm in (("o", p.o_src, o_from), ("q", p.q_src, p.q_from),
                                   ("s", p.s_src, p.s_from)):
                src = np.ascontiguousarray(src, np.int32).reshape(-1, H)
                frm = np.ascontiguousarray(frm, np.uint8).reshape(-1, H)
                if src.shape != frm.shape:
                    raise ValueError(f"{name}_src {src.shape} and {name}_from {frm.shape} "
                                     "differ in shape")
                rows[name] = (src, frm)
                keep += [src, frm]
            s.cap_o = p.cap_o
            s.n_o, s.n_q, s.n_s = (len(rows[k][0]) for k in "oqs")
            s.o_src, s.q_src, s.s_src = (_ptr(rows[k][0], ctypes.c_int32) for k in "oqs")
            s.o_from, s.q_from, s.s_from = (_ptr(rows[k][1], ctypes.c_uint8) for k in "oqs")
        if arkv_cpp.llama_arkv_submit_plan(self.ctx, structs) != 0:
            raise ValueError(f"plan refused: {last_error()}")


def _ptr(a: np.ndarray, ctype: type) -> ctypes._Pointer:
    """A pointer to a's data for one C call (the caller keeps `a` alive). Cast from the address:
    numpy's data_as() makes each pointer a reference cycle (ctypes.cast, bpo-12836) that holds
    the array until Python's rare full collection."""
    return ctypes.cast(a.ctypes.data, ctypes.POINTER(ctype))
