"""Python view of a context's tri-state KV memory: numpy statistics out, plans in.

The mechanism lives in C++ (arkv_local/csrc); this module only moves arrays across ctypes,
so that policies never touch ctypes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import arkv_cpp, defaults
from .policies.types import LayerPlan

QUANT_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # ggml_type values
# how a decoded token attends over a layer with Q rows (enum llama_arkv_attn): "auto" takes the
# fused CPU kernel for host pools and "segments" (flash attention over Q rows as they lie, and
# over O rows, merged exactly) for device pools; "dequant" dequantizes Q rows to f16 for
# llama.cpp's attention
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
        if self.n_o_init < 0 or self.n_score_queries < 0:
            raise ValueError("n_o_init and n_score_queries must be >= 0")

    def arm(self) -> None:
        """Make the next llama context created use this memory."""
        p = arkv_cpp.llama_arkv_params(
            self.budget_bytes,
            self.n_o_init,
            QUANT_TYPES[self.quant],
            self.rotate,
            self.n_score_queries,
            ATTN_PATHS[self.attn],
        )
        arkv_cpp.llama_arkv_arm(ctypes.byref(p))


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
    """One layer's pools: capacities and slots in use (equal in every KV head), and bytes."""

    cap_o: int
    cap_q: int
    n_o: int
    n_q: int
    bytes_alloc: int
    bytes_used: int


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

    def layers(self) -> list[LayerInfo]:
        out = (arkv_cpp.llama_arkv_layer_info * self.n_layer)()
        arkv_cpp.llama_arkv_get_layers(self.ctx, out)
        return [LayerInfo(i.cap_o, i.cap_q, i.n_o, i.n_q, i.bytes_alloc, i.bytes_used) for i in out]

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

    def _buffers(self, infos: list[LayerInfo], dtype: type) -> tuple[np.ndarray, np.ndarray]:
        n_o = sum(i.cap_o for i in infos) * self.n_head_kv
        n_q = sum(i.cap_q for i in infos) * self.n_head_kv
        return np.empty(n_o, dtype), np.empty(n_q, dtype)

    def positions(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per layer, the position held by each (slot, head) of O and of Q; -1 where free."""
        infos = self.layers()
        o, q = self._buffers(infos, np.int32)
        arkv_cpp.llama_arkv_get_positions(
            self.ctx, _ptr(o, ctypes.c_int32), _ptr(q, ctypes.c_int32)
        )
        return self._split(o, infos, "o"), self._split(q, infos, "q")

    def scores(self) -> Scores:
        infos = self.layers()
        sum_o, sum_q = self._buffers(infos, np.float32)  # O-sized, Q-sized
        sq_o, sq_q = self._buffers(infos, np.float32)
        f = ctypes.c_float
        n = arkv_cpp.llama_arkv_get_scores(
            self.ctx, _ptr(sum_o, f), _ptr(sq_o, f), _ptr(sum_q, f), _ptr(sq_q, f)
        )
        return Scores(
            n,
            self._split(sum_o, infos, "o"),
            self._split(sq_o, infos, "o"),
            self._split(sum_q, infos, "q"),
            self._split(sq_q, infos, "q"),
        )

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
        structs = (arkv_cpp.llama_arkv_layer_plan * self.n_layer)()
        for s, p in zip(structs, plan, strict=True):
            o_src = np.ascontiguousarray(p.o_src, np.int32).reshape(-1, self.n_head_kv)
            q_src = np.ascontiguousarray(p.q_src, np.int32).reshape(-1, self.n_head_kv)
            q_from_o = np.ascontiguousarray(p.q_from_o, np.uint8).reshape(-1, self.n_head_kv)
            if q_src.shape != q_from_o.shape:
                raise ValueError(
                    f"q_src {q_src.shape} and q_from_o {q_from_o.shape} differ in shape"
                )
            keep += [o_src, q_src, q_from_o]
            s.cap_o, s.n_o, s.n_q = p.cap_o, len(o_src), len(q_src)
            s.o_src = _ptr(o_src, ctypes.c_int32)
            s.q_src = _ptr(q_src, ctypes.c_int32)
            s.q_from_o = _ptr(q_from_o, ctypes.c_uint8)
        if arkv_cpp.llama_arkv_submit_plan(self.ctx, structs) != 0:
            raise ValueError(f"plan refused: {last_error()}")


def _ptr(a: np.ndarray, ctype: type) -> ctypes._Pointer:
    return a.ctypes.data_as(ctypes.POINTER(ctype))
