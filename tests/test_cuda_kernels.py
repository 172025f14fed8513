"""The fused attention's CUDA kernels (arkv_local/csrc/ggml-cuda-arkv-attn.cuh) run on the CPU
through tests/cuda_emu.cpp (one OS thread per CUDA thread), against numpy: the output, and the
heavy-hitter accumulators after the scored queries. No GPU here; what a device adds (its
arithmetic, CUDA graphs) is for the device check (docs/GPU.md)."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arkv_local import arkv_cpp

ROOT = Path(__file__).resolve().parent.parent
TYPES = {"q4_0": (2, 18), "q4_1": (3, 20), "q8_0": (8, 34)}  # ggml_type, bytes per block of 32


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++20 compiler builds the emulated kernels"
    exe = tmp_path_factory.mktemp("cuda_emu") / "cuda_emu"
    ggml = ROOT / "vendor" / "llama.cpp" / "ggml"
    includes = [f"-I{d}" for d in (ROOT / "arkv_local" / "csrc", ggml / "include", ggml / "src")]
    subprocess.run([cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas",
                    *includes, str(ROOT / "tests" / "cuda_emu.cpp"), f"-L{arkv_cpp.LIB_DIR}",
                    "-lggml-base", f"-Wl,-rpath,{arkv_cpp.LIB_DIR}", "-o", str(exe)], check=True)
    return exe


def blocks(rng: np.random.Generator, quant: str, n_rows: int, n: int) -> np.ndarray:
    """Random rows of ggml blocks (any nibbles and bytes are valid), scales of either sign."""
    nb = n // 32
    size = TYPES[quant][1]
    b = rng.integers(0, 256, (n_rows, nb, size), dtype=np.uint8)
    d = rng.uniform(0.02, 0.2, (n_rows, nb)) * rng.choice([-1, 1], (n_rows, nb))
    d = d.astype(np.float16)
    b[..., 0:2] = d[..., None].view(np.uint8)
    if quant == "q4_1":
        b[..., 2:4] = rng.uniform(-1, 1, (n_rows, nb, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(n_rows, nb * size)


def dequantize(b: np.ndarray, quant: str, n: int) -> np.ndarray:
    """Rows of ggml blocks to float64, from the block layouts (ggml-common.h)."""
    size = TYPES[quant][1]
    b = b.reshape(b.shape[0], n // 32, size)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float64)
    if quant == "q8_0":
        x = b[..., 2:].view(np.int8).astype(np.float64) * d
    else:
        qs = b[..., 4:] if quant == "q4_1" else b[..., 2:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], -1).astype(np.float64)
        if quant == "q4_1":
            x = nib * d + b[..., 2:4].copy().view(np.float16).astype(np.float64)
        else:
            x = (nib - 8) * d
    return x.reshape(b.shape[0], n)


def run_case(emu: Path, tmp: Path, *, D: int, n_head: int, H: int, n_tok: int, n_lo: int,
             n_o: int, n_chunk: int, n_sel: int, quant: str = "q4_0", mask_f16: bool = True,
             seed: int = 0) -> tuple[list[np.ndarray], dict[str, np.ndarray]] | None:
    """One layer's attention through the emulated kernels: ([out, acc_lo, acc_o], inputs), or
    None when the ops refuse the shapes."""
    rng = np.random.default_rng(seed)
    cap_lo, cap_o, start = n_lo + 5, n_o + 3, 7
    n_kv = n_lo + n_o
    n_mask = start + n_kv + 11
    scale = 1 / np.sqrt(D)
    q = rng.normal(size=(n_tok, n_head, D)).astype(np.float32)
    k_lo, v_lo = (blocks(rng, quant, cap_lo, H * D) for _ in range(2))
    k_o = rng.normal(size=(cap_o, H * D)).astype(np.float16)
    v_o = rng.normal(size=(cap_o, H * D)).astype(np.float16)
    # columns outside the layer's window are finite junk; the last 6 O rows are padding, hidden
    # from every query, and hold NaN (a kernel that reads them poisons the output)
    mask = rng.uniform(-3, 3, (n_tok, n_mask)).astype(np.float32)
    win = mask[:, start:start + n_kv]
    win[:] = rng.uniform(-0.5, 0.5, win.shape)
    win[:, n_kv - 6:] = -np.inf
    k_o[n_o - 6:n_o] = np.nan
    v_o[n_o - 6:n_o] = np.nan
    for t in range(n_tok):  # causal over the ubatch, and a few random holes
        win[t, n_kv - 6 - (n_tok - 1 - t):n_kv - 6] = -np.inf
        win[t, rng.choice(n_kv - 6, 5, replace=False)] = -np.inf
    win[0, :min(n_kv // 3, n_lo)] = -np.inf  # query 0 sees no key of the first chunk(s)
    if mask_f16:
        mask = mask.astype(np.float16)
    acc_lo = rng.uniform(0, 1, (2, cap_lo, H)).astype(np.float32)
    acc_o = rng.uniform(0, 1, (2, cap_o, H)).astype(np.float32)

    header = np.array([D, n_head, H, n_tok, n_lo, n_o, n_chunk, n_sel, start, n_mask, int(mask_f16),
                       TYPES[quant][0], cap_lo, cap_o], np.int32)
    src, dst = tmp / f"in{seed}", tmp / f"out{seed}"
    src.write_bytes(b"".join(a.tobytes() for a in (header, np.float32(scale), q, k_lo, v_lo, k_o,
                                                   v_o, mask, acc_lo, acc_o)))
    r = subprocess.run([str(emu), str(src), str(dst)], capture_output=True, text=True, timeout=600)
    if r.returncode == 2:
        return None
    assert r.returncode == 0, r.stderr
    got = np.fromfile(dst, np.float32)
    out = got[:n_tok * n_head * D].reshape(n_tok, n_head, D)
    rest = got[out.size:]
    inputs = dict(q=q, k_lo=k_lo, v_lo=v_lo, k_o=k_o, v_o=v_o, mask=mask, acc_lo=acc_lo,
                  acc_o=acc_o, scale=np.float64(scale), start=np.int64(start))
    got_lo = rest[:acc_lo.size].reshape(acc_lo.shape)
    return [out, got_lo, rest[acc_lo.size:].reshape(acc_o.shape)], inputs


def reference(x: dict[str, np.ndarray], *, D: int, H: int, n_lo: int, n_o: int, n_sel: int,
              quant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy in float64: softmax attention over [LO rows | O rows] under the mask window, and the
    accumulators plus sum p, sum p^2 of the last n_sel queries over each KV head's group."""
    n_tok, n_head, _ = x["q"].shape
    G = n_head // H
    k = np.concatenate([dequantize(x["k_lo"][:n_lo], quant, H * D),
                        x["k_o"][:n_o].astype(np.float64)]).reshape(-1, H, D)
    v = np.concatenate([dequantize(x["v_lo"][:n_lo], quant, H * D),
                        x["v_o"][:n_o].astype(np.float64)]).reshape(-1, H, D)
    m = x["mask"].astype(np.float64)[:, x["start"]:x["start"] + n_lo + n_o]  # (T, S)
    visible = np.isfinite(m)
    k = np.where(visible.any(0)[:, None, None], k, 0)  # hidden rows (NaN padding) weigh nothing
    v = np.where(visible.any(0)[:, None, None], v, 0)
    s = np.einsum("thd,shd->ths", x["q"].astype(np.float64), np.repeat(k, G, 1)) * x["scale"]
    s = s + m[:, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("ths,shd->thd", p, np.repeat(v, G, 1))
    ps = p[n_tok - n_sel:].reshape(n_sel, H, G, n_lo + n_o)
    t1, t2 = ps.sum((0, 2)), (ps ** 2).sum((0, 2))  # (H, S)
    acc_lo, acc_o = x["acc_lo"].astype(np.float64), x["acc_o"].astype(np.float64)
    acc_lo[0, :n_lo] += t1[:, :n_lo].T
    acc_lo[1, :n_lo] += t2[:, :n_lo].T
    acc_o[0, :n_o] += t1[:, n_lo:].T
    acc_o[1, :n_o] += t2[:, n_lo:].T
    return out, acc_lo, acc_o


CASES = {
    # Llama-3-like group of 4, one decoded token scored; chunks of unequal length
    "llama-g4-decode": dict(D=128, n_head=8, H=2, n_tok=1, n_lo=300, n_o=170, n_chunk=3, n_sel=1),
    # SmolLM2's heads (64 wide, groups of 3), three queries, two scored, an F32 mask
    "smollm2-g3": dict(D=64, n_head=9, H=3, n_tok=3, n_lo=200, n_o=100, n_chunk=4, n_sel=2,
                       mask_f16=False),
    "q4_1": dict(D=64, n_head=4, H=2, n_tok=2, n_lo=150, n_o=90, n_chunk=2, n_sel=2, quant="q4_1"),
    "q8_0": dict(D=96, n_head=4, H=1, n_tok=2, n_lo=130, n_o=70, n_chunk=1, n_sel=0, quant="q8_0"),
    # 32 rows per block, the largest: 8 queries x groups of 4 (one tile spans LO and O rows)
    "32-rows": dict(D=64, n_head=8, H=2, n_tok=8, n_lo=90, n_o=60, n_chunk=2, n_sel=8),
    # heads of 256: 32 elements of a key per lane in the logits
    "d256": dict(D=256, n_head=4, H=2, n_tok=1, n_lo=100, n_o=80, n_chunk=2, n_sel=1),
    "mha-no-lo": dict(D=64, n_head=2, H=2, n_tok=4, n_lo=0, n_o=140, n_chunk=2, n_sel=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_cuda_kernels_match_numpy(emu: Path, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    res = run_case(emu, tmp_path, **case)
    assert res is not None, "the ops refused a shape they take"
    (out, acc_lo, acc_o), inputs = res
    shape = {k: case[k] for k in ("D", "H", "n_lo", "n_o", "n_sel")}
    want_out, want_lo, want_o = reference(inputs, **shape, quant=case.get("quant", "q4_0"))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want_out, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(acc_lo, want_lo, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(acc_o, want_o, rtol=2e-4, atol=2e-6)


def test_emulated_cuda_kernels_refuse_more_rows_than_a_block_holds(emu: Path,
                                                                   tmp_path: Path) -> None:
    # 8 queries x groups of 8 = 64 rows: the ops say no (llama.cpp then takes the segments path)
    assert run_case(emu, tmp_path, D=64, n_head=8, H=1, n_tok=8, n_lo=40, n_o=40, n_chunk=1,
                    n_sel=1) is None
