"""`speed`: prefill and decode tokens/s of the tri-state memory against llama.cpp's cache."""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from functools import partial

import llama_cpp  # bound to our library: importing arkv_local.bench imported arkv_local first

from ..memory import MemoryParams, open_llama
from ..models import default_model_path, f16_slot_bytes


def bench_text_tokens(llm: llama_cpp.Llama, n: int) -> list[int]:
    """n tokens of deterministic text (Python's own sources)."""
    import argparse as a
    import textwrap as t

    text = inspect.getsource(a) + inspect.getsource(t)
    toks = llm.tokenize(text.encode())
    while len(toks) < n:
        toks += toks
    return toks[:n]


def measure(make: Callable[[], llama_cpp.Llama], depth: int, n_gen: int) -> tuple[float, float]:
    """The same as `timed` on a fresh Llama from `make`."""
    return timed(make(), depth, n_gen)


def timed(llm: llama_cpp.Llama, depth: int, n_gen: int,
          after_prefill: Callable[[], object] | None = None) -> tuple[float, float]:
    """Prefill `depth` tokens, then decode `n_gen` one by one: (prefill tok/s, decode tok/s);
    after_prefill runs in between, untimed."""
    toks = bench_text_tokens(llm, depth + n_gen)
    t0 = time.perf_counter()
    llm.eval(toks[:depth])
    if after_prefill is not None:
        t = time.perf_counter()
        after_prefill()
        t0 += time.perf_counter() - t
    t1 = time.perf_counter()
    for tok in toks[depth:]:
        llm.eval([tok])
    t2 = time.perf_counter()
    return depth / (t1 - t0), n_gen / (t2 - t1)


def speed(args: argparse.Namespace) -> None:
    """Print prefill/decode tok/s per depth: stock f16 vs tri-state memory."""
    path = args.model or str(default_model_path())
    print(f"model {path}, threads {args.threads}, flash attention {args.flash_attn}")
    print(f"{'depth':>6} {'cache':>36} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for depth in args.depths:
        n_ctx = depth + args.n_gen + 256
        common = dict(n_ctx=n_ctx, n_batch=512, n_threads=args.threads, verbose=False,
                      flash_attn=args.flash_attn == "on", n_gpu_layers=args.n_gpu_layers)
        budget = n_ctx * f16_slot_bytes(path)
        makers = {
            "stock f16": partial(llama_cpp.Llama, path, **common),
            "tri-state, none evicted": partial(
                open_llama, path, MemoryParams(budget, n_score_queries=0), **common),
            "tri-state, none evicted, + scores": partial(
                open_llama, path, MemoryParams(budget, n_score_queries=32), **common),
        }
        measure(makers["stock f16"], 64, 8)  # warm-up: page in the model
        best = {name: (0.0, 0.0) for name in makers}
        for _ in range(args.repeat):  # interleaved, best of each: shared machines are noisy
            for name, make in makers.items():
                pp, tg = measure(make, depth, args.n_gen)
                best[name] = (max(best[name][0], pp), max(best[name][1], tg))
        for name, (pp, tg) in best.items():
            print(f"{depth:>6} {name:>36} {pp:>14.1f} {tg:>13.1f}", flush=True)
