"""seq_add, seq_rm of a middle range and llama.cpp's context shift on the tri-state memory.

The context shift: seq_rm(seq, n_keep, n_keep + n_discard), then seq_add(seq, n_keep + n_discard,
-1, -n_discard), then decoding past the new end. Checked row by row against numpy (each shifted
row's K rotated by its position change as ggml's RoPE does, in the model's basis, and quantized
again where it is quantized), end to end against a cache that computed its rows at the new
positions in the first place, and against llama.cpp's own cache doing the same calls.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from test_reference import (
    N_NEXT,
    N_PAST,
    QUANT_CAP_O,
    QUANT_COUNTS,
    SEED,
    cache_rows,
    per_head_plan,
    q4_0_blocks,
)
from test_spill import identity_plan, split_plan

from arkv_local import arkv_cpp  # binds llama_cpp to our library
from arkv_local.memory import LayerPlan, MemoryParams, TriStateKV, last_error, open_llama
from arkv_local.models import f16_slot_bytes
from arkv_local.policies.types import POOL_O
from arkv_local.tiny_models import tiny_model_path

BUDGET = 256  # f16 tokens per layer
CAP_S = 128
# ARKV_TEST_N_GPU_LAYERS: the device check (arkv_local/bench/gpu.py) runs these tests offloaded
CTX = dict(n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False,
           n_gpu_layers=int(os.environ.get("ARKV_TEST_N_GPU_LAYERS", "0")))
N_KEEP, N_DISCARD = 24, 40  # the context shift: positions [N_KEEP, N_KEEP + N_DISCARD) go

# Tolerances on |logit| differences (logits reach ~1.5) between a shifted cache and one that
# computed its rows at the new positions; in brackets the largest measured on CPU over seeds 0-9 and
# 1234, rotation on and off (mul_mat attention). Only K is shifted: the tiny Llama attends almost
# uniformly and hardly sees K, Qwen3's q/k norms make its attention sharp.
# f16 rows: re-roped in f32 and rounded to f16 again, one f16 ulp from a row roped once.
TOL_F16 = 1e-3  # [llama 8.2e-5, qwen3 4.4e-4]
# the same calls on llama.cpp's f16 cache: the same K values, attended in another order [1.6e-5]
TOL_STOCK = 1e-4
# A shifted Q4_0 row is dequantized, roped and quantized again: its K rounding is another draw
# than a row's quantized once at the new position, as large as quantization itself. [llama
# 6.8e-3, qwen3 0.113]; the same rows relabeled without rotating K: [llama 0.028, qwen3 0.32]
# (seeds 0-2)
TOL_Q4 = {"llama": 0.015, "qwen3": 0.15}


# -- helpers ---------------------------------------------------------------------------------


def tiny(arch: str, n_layer: int = 2) -> Path:
    """A tiny Llama (RoPE NORM) or Qwen3 (RoPE NEOX) with 2 KV heads of 64 (one rotation block)."""
    return tiny_model_path(arch, n_layer=n_layer, n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                           head_dim=64)


def rope_base(path: Path) -> float:
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    return float(reader.fields[f"{arch}.rope.freq_base"].contents())


def open_cache(path: Path, rotate: bool, cap_s: int = 0,
               attn: str = "dequant") -> tuple[llama_cpp.Llama, TriStateKV]:
    params = MemoryParams(BUDGET * f16_slot_bytes(path), rotate=rotate, cap_s=cap_s, attn=attn)
    llm = open_llama(str(path), params, **CTX)
    return llm, TriStateKV(llm.ctx)


def decode(llm: llama_cpp.Llama, tokens: list[int], positions: range | list[int]) -> np.ndarray:
    """Decode tokens at the given positions in one batch; their logits (n, n_vocab)."""
    n = len(tokens)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, (t, p) in enumerate(zip(tokens, positions, strict=True)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, True
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
        n_vocab = llm.n_vocab()
        return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i),
                                               (n_vocab,)).astype(np.float64) for i in range(n)])
    finally:
        llama_cpp.llama_batch_free(batch)


def decode_each(llm: llama_cpp.Llama, tokens: list[int], first: int) -> np.ndarray:
    """Decode tokens one at a time from position first; their logits."""
    return np.concatenate([decode(llm, [t], [first + i]) for i, t in enumerate(tokens)])


def memory(llm: llama_cpp.Llama) -> llama_cpp.llama_memory_t:
    return llama_cpp.llama_get_memory(llm.ctx)


def context_shift(llm: llama_cpp.Llama, n_keep: int, n_discard: int) -> bool:
    """llama.cpp's context shift: drop [n_keep, n_keep + n_discard), move the rest down."""
    mem = memory(llm)
    if not llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard):
        return False
    llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, -1, -n_discard)
    return True


def hadamard(n: int) -> np.ndarray:
    """llama.cpp's orthonormal Sylvester Walsh-Hadamard matrix (symmetric: its own inverse)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """ggml's RoPE of rows x (n, D) at positions pos (n,): pairs (2i, 2i+1) (NORM, Llama) or
    (i, i + D/2) (NEOX, Qwen3) rotate by pos * base^(-2i/D), the angles computed as ggml does, in
    float32, each the previous one times base^(-2/D) (off by up to ~1e-5 rad from exact ones)."""
    d = x.shape[-1]
    scale = np.float32(np.float32(base) ** np.float32(-2.0 / d))
    theta = np.empty((len(pos), d // 2), np.float32)
    theta[:, 0] = pos
    for i in range(1, d // 2):
        theta[:, i] = theta[:, i - 1] * scale
    theta = theta.astype(np.float64)
    cos, sin = np.cos(theta), np.sin(theta)
    i0, i1 = (np.arange(d // 2), np.arange(d // 2, d)) if neox else (np.arange(0, d, 2),
                                                                       np.arange(1, d, 2))
    out = np.empty_like(x)
    out[:, i0] = x[:, i0] * cos - x[:, i1] * sin
    out[:, i1] = x[:, i0] * sin + x[:, i1] * cos
    return out


def q4_0_values(blocks: np.ndarray) -> np.ndarray:
    """Values of Q4_0 rows (..., n/32, 18) as (..., n)."""
    d = blocks[..., :2].copy().view(np.float16).astype(np.float64)  # (..., nb, 1)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], -1).astype(np.float64) - 8
    return (q * d).reshape(*blocks.shape[:-2], -1)


def reroped(x: np.ndarray, delta: np.ndarray, base: float, neox: bool, rot: bool) -> np.ndarray:
    """Rows x (n, D) as stored (rotated when rot) after a shift by delta: turned back into the
    model's basis, roped, rotated again."""
    h = hadamard(x.shape[-1]) if rot else np.eye(x.shape[-1])
    return rope(x @ h, delta.astype(np.float64), base, neox) @ h


def assert_k_shifted(before: dict, after: dict, pool: str, delta: np.ndarray, moved: np.ndarray,
                     base: float, neox: bool, rot: bool) -> None:
    """One head's K rows of a pool (O: f16, q/s: Q4_0 blocks): the moved ones re-roped by delta,
    the others unchanged."""
    k0, k1 = before, after
    assert (k0[~moved] == k1[~moved]).all(), f"{pool}: unshifted K rows changed"
    if not moved.any():
        return
    if pool == "o":
        want = reroped(k0[moved].astype(np.float64), delta[moved], base, neox, rot)
        got = k1[moved].astype(np.float64)
        # rounded to f16 from ggml's f32 (whose sums over a rotation block are off by ~1e-7 of
        # the row's largest value): within one f16 ulp
        atol = 1e-6 * np.abs(want).max(-1, keepdims=True)
        assert (np.abs(got - want) <= 2**-10 * np.abs(want) + atol).all(), "O rows"
        return
    want_f32 = reroped(q4_0_values(k0[moved]), delta[moved], base, neox, rot).astype(np.float32)
    want = q4_0_values(q4_0_blocks(want_f32))
    got = q4_0_values(k1[moved])
    # quantized again from f32 rows that differ from numpy's by ~1e-7: a rare value lands one
    # step (its block's scale) apart
    step = np.abs(k1[moved][..., :2].copy().view(np.float16).astype(np.float64))
    step = np.repeat(step[..., 0], 32, -1).reshape(got.shape)
    assert (np.abs(got - want) <= 1.01 * step + 1e-7).all(), f"{pool} rows: more than a step"
    assert (got != want).mean() < 0.01, f"{pool} rows: too many values a step apart"


def state_plan(mem: TriStateKV, states: np.ndarray, cap_o: int) -> list[LayerPlan]:
    """A plan over a cache whose rows all lie in O in position order (slot = position): states
    (n_layer, n_slots, n_head_kv) of "O", "Q", "S" or "E" says where each goes, per head."""
    plan = []
    for layer_states in states:
        cols = {s: [np.flatnonzero(layer_states[:, h] == s) for h in range(mem.n_head_kv)]
                for s in "OQS"}
        o, q, s = (np.ascontiguousarray(np.stack(cols[k], 1), np.int32) for k in "OQS")
        plan.append(LayerPlan(cap_o, o, q, np.full(q.shape, POOL_O, np.uint8),
                              s, np.full(s.shape, POOL_O, np.uint8)))
    return plan


def random_states(rng: np.random.Generator, n_layer: int, n_head_kv: int) -> np.ndarray:
    """Per layer and head its own states of N_PAST positions, as many of each state per head in
    the discarded range [N_KEEP, N_KEEP + N_DISCARD) and outside it (so the range can go)."""
    outside = np.array(list("O" * 60 + "Q" * 60 + "S" * 30 + "E" * 10))
    inside = np.array(list("O" * 10 + "Q" * 15 + "S" * 10 + "E" * 5))
    assert len(outside) + len(inside) == N_PAST and len(inside) == N_DISCARD
    states = np.empty((n_layer, N_PAST, n_head_kv), "<U1")
    rng_ = np.arange(N_KEEP, N_KEEP + N_DISCARD)
    rest = np.setdiff1d(np.arange(N_PAST), rng_)
    for layer in range(n_layer):
        for h in range(n_head_kv):
            states[layer, rest, h] = rng.permutation(outside)
            states[layer, rng_, h] = rng.permutation(inside)
    return states


def pool_sets(mem: TriStateKV) -> list[list[dict[str, list[int]]]]:
    """Per layer and head, the positions held in O, Q and S (sorted)."""
    infos = mem.layers()
    pos = mem.positions()
    return [[{k: sorted(p[layer][:n, h].tolist()) for k, p, n in
              zip("OQS", pos, (info.n_o, info.n_q, info.n_s), strict=True)}
             for h in range(mem.n_head_kv)] for layer, info in enumerate(infos)]


# -- seq_add: rows re-roped in every pool ----------------------------------------------------


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shifted_rows_are_re_roped_in_every_pool(arch: str, rotate: bool) -> None:
    # per head its own O, Q and S rows; positions [40, 150) move down by 23 (onto others: a
    # position may repeat, as in llama.cpp): K re-roped where it lies, V and the rest untouched
    path = tiny(arch)
    p0, p1, delta = 40, 150, -23
    llm, mem = open_cache(path, rotate, cap_s=CAP_S)
    rng = np.random.default_rng(SEED)
    decode(llm, rng.integers(0, llm.n_vocab(), N_PAST).tolist(), range(N_PAST))
    mem.submit(split_plan(mem, rng, spill=True)[0])
    mem.apply()
    before, pos_before = cache_rows(llm, mem), mem.positions()
    llama_cpp.llama_memory_seq_add(memory(llm), 0, p0, p1, delta)
    # positions move at once (as llama.cpp's cells), the rows at the next update
    for a, b in zip(pos_before, mem.positions(), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.where((x >= p0) & (x < p1), x + delta, x), y)
    assert arkv_cpp.llama_arkv_apply_plan(llm.ctx) == 0
    assert arkv_cpp.llama_arkv_apply_plan(llm.ctx) == 1  # nothing left pending
    after = cache_rows(llm, mem)
    base, neox = rope_base(path), arch == "qwen3"
    for old, new in zip(before, after, strict=True):
        for pool in "oqs":
            p = old["pos_" + pool]
            moved = (p >= p0) & (p < p1)
            assert moved.any() and (~moved).any()
            np.testing.assert_array_equal(new["pos_" + pool], np.where(moved, p + delta, p))
            np.testing.assert_array_equal(new["v_" + pool], old["v_" + pool])
            for h in range(mem.n_head_kv):
                assert_k_shifted(old["k_" + pool][:, h], new["k_" + pool][:, h], pool,
                                 np.full(len(p), delta), moved[:, h], base, neox, rotate)
    del llm


@pytest.mark.parametrize("pools", ["o", "oq", "oqs"])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shift_matches_rows_computed_at_the_new_positions(arch: str, rotate: bool,
                                                          pools: str) -> None:
    # A: rows computed at positions from base_a, then every one shifted by delta; B: the same
    # tokens computed at base_a + delta in the first place. The same per-head plan (O, Q, S),
    # then the same tokens decoded at the same positions. The spilled rows come back into Q
    # with a plan submitted while the shift is pending (it applies after the shift).
    path = tiny(arch)
    delta = -37 if arch == "llama" else 37
    base_a = max(0, -delta)
    out = {}
    for shifted in (True, False):
        llm, mem = open_cache(path, rotate, cap_s=CAP_S if "s" in pools else 0)
        rng = np.random.default_rng(SEED)
        tokens = rng.integers(0, llm.n_vocab(), N_PAST + N_NEXT).tolist()
        base = base_a if shifted else base_a + delta
        decode(llm, tokens[:N_PAST], range(base, base + N_PAST))
        if pools == "oq":
            mem.submit(per_head_plan(mem, rng, QUANT_COUNTS, QUANT_CAP_O)[0])
        elif pools == "oqs":
            mem.submit(split_plan(mem, rng, spill=True)[0])
        mem.apply()
        if shifted:
            llama_cpp.llama_memory_seq_add(memory(llm), 0, 0, -1, delta)
            assert llama_cpp.llama_memory_seq_pos_max(memory(llm), 0) == base_a + delta + N_PAST - 1
        if "s" in pools:
            mem.submit(identity_plan(mem, recall=True))
        out[shifted] = decode_each(llm, tokens[N_PAST:], base_a + delta + N_PAST)
        assert all(i.n_s == 0 for i in mem.layers())
        del llm
    tol = TOL_F16 if pools == "o" else TOL_Q4[arch]
    assert np.abs(out[True] - out[False]).max() <= tol


def relabeled_state(llm: llama_cpp.Llama, mem: TriStateKV, delta: int) -> bytes:
    """The sequence state (ARKV state version 4) with every position moved by delta and K left
    as it is: what a shift that forgot to rotate K would leave."""
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0) == size
    data = bytearray(buf)
    h, d = mem.n_head_kv, mem.head_dim
    row_o, row_q = h * d * 2, h * d // 32 * 18

    def positions(off: int, n: int) -> int:
        pos = np.frombuffer(data, np.int32, n, off)  # a view: edits go into data
        pos[pos >= 0] += delta
        return off + 4 * n

    assert np.frombuffer(data, np.uint32, 2, 8).tolist() == [0x564B5241, 4]
    off = positions(8 + 7 * 4 + 8, 2)  # after the header and arena bytes: pos_max, pos_planned_max
    off += 4
    for _ in range(mem.n_layer):
        _, n_o, n_q, n_s = np.frombuffer(data, np.uint32, 4, off)
        off += 16
        for n in (n_o, n_q, n_s):
            off = positions(off, int(n) * h)
        off += 2 * (n_o * row_o + (n_q + n_s) * row_q) + 2 * 4 * h * (n_o + n_q + n_s)
    assert off == len(data)
    return bytes(data)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_shift_that_did_not_rotate_k_would_be_seen(arch: str) -> None:
    # the checks above can fail: the same rows relabeled by the shift without rotating K
    path = tiny(arch)
    rng = np.random.default_rng(SEED)
    logits = []
    tokens = rng.integers(0, llama_cpp.Llama(str(path), vocab_only=True, verbose=False).n_vocab(),
                          N_PAST + N_NEXT).tolist()
    for rotate_k in (True, False):
        llm, mem = open_cache(path, rotate=False)
        decode(llm, tokens[:N_PAST], range(37, 37 + N_PAST))
        if rotate_k:
            llama_cpp.llama_memory_seq_add(memory(llm), 0, 0, -1, -37)
        else:
            state = relabeled_state(llm, mem, -37)
            llm, mem = open_cache(path, rotate=False)
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            assert llama_cpp.llama_state_seq_set_data(llm.ctx, buf, len(state), 0) == len(state)
        logits.append(decode_each(llm, tokens[N_PAST:], N_PAST))
    assert np.abs(logits[0] - logits[1]).max() > TOL_Q4[arch]


# -- the context shift -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_context_shift_matches_llama_cpp_cache(arch: str) -> None:
    # every row in f16, no rotation: the same calls on llama.cpp's cache and ours, the same logits
    # (llama.cpp ropes its f16 K in place, we gather, rope in f32 and scatter: the same values)
    path = tiny(arch)
    rng = np.random.default_rng(SEED)
    stock = llama_cpp.Llama(str(path), **CTX)
    ours, mem = open_cache(path, rotate=False)
    tokens = rng.integers(0, stock.n_vocab(), N_PAST + 2 * N_NEXT).tolist()
    out = []
    for llm in (stock, ours):
        decode(llm, tokens[:N_PAST], range(N_PAST))
        assert llama_cpp.llama_memory_can_shift(memory(llm))
        assert context_shift(llm, N_KEEP, N_DISCARD)
        n = N_PAST - N_DISCARD
        assert llama_cpp.llama_memory_seq_pos_max(memory(llm), 0) == n - 1
        first = decode_each(llm, tokens[N_PAST:N_PAST + N_NEXT], n)
        # and again, with the new tokens in the cache; seq_add below 0 drops rows, as llama.cpp
        llama_cpp.llama_memory_seq_add(memory(llm), 0, N_KEEP, -1, -N_KEEP - 10)
        assert llama_cpp.llama_memory_seq_pos_min(memory(llm), 0) == 0
        n += N_NEXT - N_KEEP - 10
        assert llama_cpp.llama_memory_seq_pos_max(memory(llm), 0) == n - 1
        out.append(np.concatenate([first, decode_each(llm, tokens[N_PAST + N_NEXT:], n)]))
    pos_o = mem.positions()[0]
    want = list(range(N_KEEP)) + list(range(N_PAST - N_DISCARD + N_NEXT - N_KEEP - 10))
    for layer, info in enumerate(mem.layers()):
        assert info.n_o == len(want) + N_NEXT
        assert (pos_o[layer][:info.n_o - N_NEXT] == np.array(want)[:, None]).all()
    # the rows attend in another order (llama.cpp fills the freed cells first)
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=TOL_STOCK)
    del ours


def test_pending_shifts_and_removals_compose_as_llama_cpp() -> None:
    # several calls before the rows follow: a shift, two removals (the second composed with the
    # first, the shift owed following its rows), a shift onto positions still held (a position
    # repeats, as in llama.cpp); then decoding, against llama.cpp's cache making the same calls
    path = tiny("qwen3")
    rng = np.random.default_rng(SEED)
    stock = llama_cpp.Llama(str(path), **CTX)
    ours, mem = open_cache(path, rotate=False)
    tokens = rng.integers(0, stock.n_vocab(), N_PAST + N_NEXT).tolist()
    out = []
    for llm in (stock, ours):
        decode(llm, tokens[:N_PAST], range(N_PAST))
        mem_ = memory(llm)
        llama_cpp.llama_memory_seq_add(mem_, 0, 0, -1, 10)
        assert llama_cpp.llama_memory_seq_rm(mem_, 0, 30, 40)
        assert llama_cpp.llama_memory_seq_rm(mem_, 0, 100, 120)
        llama_cpp.llama_memory_seq_add(mem_, 0, 120, -1, -30)
        assert llama_cpp.llama_memory_seq_pos_min(mem_, 0) == 10
        assert llama_cpp.llama_memory_seq_pos_max(mem_, 0) == N_PAST + 10 - 31
        out.append(decode_each(llm, tokens[N_PAST:], N_PAST - 20))
    want = [*range(10, 30), *range(40, 100), *range(90, 180)]
    for layer in range(mem.n_layer):
        assert mem.positions()[0][layer][:len(want), 0].tolist() == want
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=TOL_STOCK)
    del ours


@pytest.mark.parametrize(("arch", "rotate"), [("llama", False), ("qwen3", True)])
def test_context_shift_keeps_o_q_s_rows(arch: str, rotate: bool) -> None:
    # A: N_PAST tokens, each head its own O/Q/S/evicted rows, the context shift, the spilled rows
    # recalled into Q, N_NEXT tokens decoded. B: only the kept tokens, at their new positions, the
    # same rows in the same states, the same tokens decoded. One layer: a row's K and V depend on
    # its token and position only, so B can compute what A keeps (deeper layers of A saw the
    # discarded tokens while prefilling).
    path = tiny(arch, n_layer=1)
    rng = np.random.default_rng(SEED)
    llm_a, mem_a = open_cache(path, rotate, cap_s=CAP_S)
    llm_b, mem_b = open_cache(path, rotate, cap_s=CAP_S)
    tokens = rng.integers(0, llm_a.n_vocab(), N_PAST + N_NEXT).tolist()
    states = random_states(rng, 1, mem_a.n_head_kv)
    kept = np.r_[0:N_KEEP, N_KEEP + N_DISCARD:N_PAST]  # old positions kept, in their new order
    n = len(kept)

    decode(llm_a, tokens[:N_PAST], range(N_PAST))
    mem_a.submit(state_plan(mem_a, states, QUANT_CAP_O))
    mem_a.apply()
    before = cache_rows(llm_a, mem_a)[0]
    assert context_shift(llm_a, N_KEEP, N_DISCARD)
    # the positions are the new ones at once, every pool compacted
    got = pool_sets(mem_a)
    for h in range(mem_a.n_head_kv):
        for k in "OQS":
            assert got[0][h][k] == np.flatnonzero(states[0, kept, h] == k).tolist(), (h, k)
    assert llama_cpp.llama_memory_seq_pos_max(memory(llm_a), 0) == n - 1
    assert mem_a.free_slots() == QUANT_CAP_O - 60
    mem_a.apply()
    assert pool_sets(mem_a) == got

    # A's rows: each head's rows outside the range, in slot order, K re-roped past it
    rows_a = cache_rows(llm_a, mem_a)[0]
    base, neox = rope_base(path), arch == "qwen3"
    for pool in "oqs":
        for h in range(mem_a.n_head_kv):
            p_new = rows_a["pos_" + pool][:, h]
            slot = {p: i for i, p in enumerate(before["pos_" + pool][:, h].tolist())}
            src = [slot[p if p < N_KEEP else p + N_DISCARD] for p in p_new.tolist()]
            assert src == sorted(src)
            np.testing.assert_array_equal(rows_a["v_" + pool][:, h], before["v_" + pool][src, h])
            assert_k_shifted(before["k_" + pool][src, h], rows_a["k_" + pool][:, h], pool,
                             np.full(len(src), -N_DISCARD), p_new >= N_KEEP, base, neox, rotate)

    # B computed them at the new positions: the same V, K before the range, K close after it
    decode(llm_b, [tokens[i] for i in kept], range(n))
    mem_b.submit(state_plan(mem_b, states[:, kept], QUANT_CAP_O))
    mem_b.apply()
    assert pool_sets(mem_b) == got
    rows_b = cache_rows(llm_b, mem_b)[0]
    for pool in "oqs":
        np.testing.assert_array_equal(rows_a["pos_" + pool], rows_b["pos_" + pool])
        np.testing.assert_array_equal(rows_a["v_" + pool], rows_b["v_" + pool])
        k_a, k_b = rows_a["k_" + pool], rows_b["k_" + pool]
        unshifted = rows_a["pos_" + pool] < N_KEEP
        assert (k_a[unshifted] == k_b[unshifted]).all()
        if pool == "o":  # f16 ulps apart (of the row's largest values, when rotating)
            k_a, k_b = k_a.astype(np.float64), k_b.astype(np.float64)
            assert np.abs(k_a - k_b).max() <= 2**-9 * np.abs(k_b).max()

    logits = []
    for llm, mem in ((llm_a, mem_a), (llm_b, mem_b)):
        mem.submit(identity_plan(mem, recall=True))  # the spilled rows are read from here on
        logits.append(decode_each(llm, tokens[N_PAST:], n))
    assert np.abs(logits[0] - logits[1]).max() <= TOL_Q4[arch]
    del llm_a, llm_b


def test_heads_keeping_rows_in_different_pools_move_q_rows_up() -> None:
    # in the discarded range head 0 kept 10 rows in O and 20 in Q, head 1 the other way round:
    # after the removal head 0 has 10 O rows more. Head 1's 10 newest Q rows move up into O,
    # holding the values attention read from them (the f16 of their dequantized Q4_0).
    path = tiny("llama", n_layer=1)
    llm, mem = open_cache(path, rotate=False)
    rng = np.random.default_rng(SEED)
    decode(llm, rng.integers(0, llm.n_vocab(), N_PAST).tolist(), range(N_PAST))
    states = np.empty((1, N_PAST, 2), "<U1")
    rest = np.setdiff1d(np.arange(N_PAST), np.arange(N_KEEP, N_KEEP + N_DISCARD))
    inside = {0: "O" * 10 + "Q" * 20 + "E" * 10, 1: "O" * 20 + "Q" * 10 + "E" * 10}
    outside = {0: "O" * 70 + "Q" * 80 + "E" * 10, 1: "O" * 60 + "Q" * 90 + "E" * 10}
    for h in (0, 1):
        states[0, N_KEEP:N_KEEP + N_DISCARD, h] = rng.permutation(list(inside[h]))
        states[0, rest, h] = rng.permutation(list(outside[h]))
    mem.submit(state_plan(mem, states, QUANT_CAP_O))
    mem.apply()
    decode(llm, [1, 2, 3], range(N_PAST, N_PAST + 3))  # scores to follow the rows
    before, sc_before = cache_rows(llm, mem)[0], mem.scores()
    assert llama_cpp.llama_memory_seq_rm(memory(llm), 0, N_KEEP, N_KEEP + N_DISCARD)
    info = mem.layers()[0]
    assert (info.n_o, info.n_q) == (73, 80)  # head 0: 70 + 3 new in O; head 1: 63 + 10 moved up
    sc_pending = mem.scores()  # read through the removal not applied yet
    mem.apply()
    after, sc_after = cache_rows(llm, mem)[0], mem.scores()
    for h in (0, 1):
        old_o, old_q = before["pos_o"][:, h], before["pos_q"][:, h]
        new_o, new_q = after["pos_o"][:, h], after["pos_q"][:, h]
        gone = set(range(N_KEEP, N_KEEP + N_DISCARD))
        assert set(new_o.tolist()) | set(new_q.tolist()) == (set(old_o.tolist())
                                                             | set(old_q.tolist())) - gone
        assert (np.diff(new_o) > 0).all()  # O in position order
        up = sorted(set(new_o.tolist()) - set(old_o.tolist()))
        kept_q = sorted(set(old_q.tolist()) - gone)
        assert up == (kept_q[-10:] if h == 1 else [])  # the newest Q rows
        for p in up:
            q_slot, o_slot = np.flatnonzero(old_q == p)[0], np.flatnonzero(new_o == p)[0]
            for kv in "kv":
                want = q4_0_values(before[kv + "_q"][q_slot, h]).astype(np.float16)
                np.testing.assert_array_equal(after[kv + "_o"][o_slot, h], want)
        # every kept row took its scores along, whatever pool it went to
        old_sc = dict(zip(old_o.tolist(), sc_before.sum_o[0][:len(old_o), h], strict=True))
        old_sc |= dict(zip(old_q.tolist(), sc_before.sum_q[0][:len(old_q), h], strict=True))
        for sc in (sc_pending, sc_after):
            got = dict(zip(new_o.tolist(), sc.sum_o[0][:len(new_o), h], strict=True))
            got |= dict(zip(new_q.tolist(), sc.sum_q[0][:len(new_q), h], strict=True))
            assert got == {p: old_sc[p] for p in got}
            assert not sc.sum_o[0][len(new_o):].any() and not sc.sum_q[0][len(new_q):].any()
    del llm


# -- what is refused, and state --------------------------------------------------------------


def test_seq_div_is_refused() -> None:
    llm, mem = open_cache(tiny("llama"), rotate=False)
    decode(llm, list(range(50)), range(50))
    before = mem.positions()[0][0].copy()
    llama_cpp.llama_memory_seq_div(memory(llm), 0, 10, -1, 1)  # trivial: nothing to refuse
    llama_cpp.llama_memory_seq_div(memory(llm), 0, 60, -1, 2)  # no row there
    assert last_error() == ""
    llama_cpp.llama_memory_seq_div(memory(llm), 0, 10, -1, 2)
    assert "cannot divide positions (seq_div" in last_error()
    np.testing.assert_array_equal(mem.positions()[0][0], before)
    del llm


def test_removal_is_refused_where_heads_keep_different_tokens() -> None:
    # head 0 evicted a position of the range that head 1 keeps: after removing the range head 0
    # would hold one row more than head 1, which one mask cannot serve. Nothing changes.
    llm, mem = open_cache(tiny("llama", n_layer=1), rotate=False)
    decode(llm, list(range(100)), range(100))
    o = np.stack([np.r_[0:30, 31:100], np.r_[0:40, 41:100]], 1).astype(np.int32)
    none = np.zeros((0, 2), np.int32)
    mem.submit([LayerPlan(BUDGET, o, none, none.astype(np.uint8))])
    mem.apply()
    before = pool_sets(mem)
    assert not llama_cpp.llama_memory_seq_rm(memory(llm), 0, 35, 45)
    assert "KV head 0 would keep 89 attended and 0 spilled rows, head 1 90" in last_error()
    # and a seq_add that would move the same rows below 0 shifts nothing
    llama_cpp.llama_memory_seq_add(memory(llm), 0, 35, -1, -45)
    assert "cannot remove positions [35, 45)" in last_error()
    assert pool_sets(mem) == before
    # the same rows in both heads: fine
    assert llama_cpp.llama_memory_seq_rm(memory(llm), 0, 50, 60)
    assert mem.layers()[0].n_o == 89
    del llm


def test_removal_waits_for_a_pending_plan() -> None:
    llm, mem = open_cache(tiny("llama"), rotate=False)
    decode(llm, list(range(100)), range(100))
    mem.submit(identity_plan(mem, recall=False))
    assert not llama_cpp.llama_memory_seq_rm(memory(llm), 0, 10, 20)
    assert "a plan is pending" in last_error()
    mem.apply()
    assert llama_cpp.llama_memory_seq_rm(memory(llm), 0, 10, 20)
    assert mem.layers()[0].n_o == 90
    # a plan submitted while a removal is pending names the slots as the positions show them
    llama_cpp.llama_memory_seq_add(memory(llm), 0, 20, -1, -10)
    pos = mem.positions()[0][0][:90, 0]
    assert pos.tolist() == list(range(90))
    mem.submit([LayerPlan(BUDGET, np.repeat(np.arange(80, dtype=np.int32)[:, None], 2, 1),
                          np.zeros((0, 2), np.int32), np.zeros((0, 2), np.uint8))] * 2)
    mem.apply()
    assert mem.positions()[0][0][:80, 0].tolist() == list(range(80))
    del llm


def test_state_after_a_context_shift_round_trips() -> None:
    # a state cannot be saved while the rows still owe the shift; once applied, it is saved, and
    # loaded into a new context it decodes as the first one does
    path = tiny("qwen3")
    rng = np.random.default_rng(SEED)
    llm, mem = open_cache(path, rotate=True, cap_s=CAP_S)
    tokens = rng.integers(0, llm.n_vocab(), N_PAST + N_NEXT).tolist()
    decode(llm, tokens[:N_PAST], range(N_PAST))
    mem.submit(state_plan(mem, random_states(rng, mem.n_layer, mem.n_head_kv), QUANT_CAP_O))
    mem.apply()
    assert context_shift(llm, N_KEEP, N_DISCARD)
    assert llama_cpp.llama_state_get_size(llm.ctx) == 0  # refused (llama.cpp logs the error)
    assert "not applied to the rows yet" in last_error()
    mem.apply()
    size = llama_cpp.llama_state_get_size(llm.ctx)
    state = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_get_data(llm.ctx, state, size) == size
    n = N_PAST - N_DISCARD
    positions = pool_sets(mem)
    want = decode_each(llm, tokens[N_PAST:], n)
    other, mem2 = open_cache(path, rotate=True, cap_s=CAP_S)
    assert llama_cpp.llama_state_set_data(other.ctx, state, size) == size
    assert pool_sets(mem2) == positions
    np.testing.assert_array_equal(decode_each(other, tokens[N_PAST:], n), want)
    del llm, other


def test_tail_cut_after_a_shift_matches_llama_cpp_cache() -> None:
    # a cut reaches rows the shift moved (the removal and the rotation owed compose), then the
    # sequence goes on from the cut: llama.cpp's cache cut by seq_rm, ours by TriStateKV.cut
    # (seq_rm refuses a tail the shift moved), the same logits
    path = tiny("llama")
    stock = llama_cpp.Llama(str(path), **CTX)
    ours, mem = open_cache(path, rotate=False)
    out = []
    for llm in (stock, ours):
        decode(llm, list(range(100)), range(100))
        assert context_shift(llm, 4, 20)
        decode(llm, [1, 2, 3], range(80, 83))
        assert llama_cpp.llama_memory_seq_rm(memory(llm), 0, 81, -1)
        assert llama_cpp.llama_memory_seq_pos_max(memory(llm), 0) == 80
        if llm is ours:  # rows the shift moved
            assert not llama_cpp.llama_memory_seq_rm(memory(llm), 0, 70, -1)
            assert mem.cut(70)
        else:
            assert llama_cpp.llama_memory_seq_rm(memory(llm), 0, 70, -1)
        assert llama_cpp.llama_memory_seq_pos_max(memory(llm), 0) == 69
        out.append(decode_each(llm, [4, 5, 6], 70))
    for layer in range(mem.n_layer):
        assert sorted(mem.positions()[0][layer][:73, 0]) == list(range(73))
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=TOL_STOCK)
    del ours
