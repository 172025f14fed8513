"""`python -m arkv_local.bench plans`: what planning costs a policy in Python at a model's shape
and depth, without the model (numpy alone).

A prompt of --depth tokens is read in chunks as the eval loop reads it (the policy's read_chunk
for the budget), then --decode tokens are decoded; before each chunk, and whenever decoding has
filled the slack, the policy plans room, and the plan is applied to a simulated layout: per
layer and KV head, the positions each slot of O, Q and S holds (a plan keeps, moves, quantizes,
spills or evicts them as it would in the cache). Attention masses and prefill statistics are
random; the spill holds every token. The default shape is Llama-3-8B's cache (32 layers, 8 KV heads
of 128), as the device check's bench model. Only arkv_local.policies is imported, so the same
file times an older checkout's policies: `PYTHONPATH=OLD python arkv_local/bench/plans.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from arkv_local import defaults
from arkv_local.policies import make_policy
from arkv_local.policies.types import POOL_O, POOL_Q, POOL_S, Budget, KVView, LayerView


def simulate(policy: str, depth: int, fraction: float, n_layer: int, n_head_kv: int,
             head_dim: int, n_decode: int = 0, slack: int = 0, seed: int = 0,
             threads: int = 1) -> dict[str, Any]:
    """Read `depth` tokens under `policy` at `fraction` of the f16 bytes, then decode
    `n_decode`; the plans' times. slack: the policy's (0: Llama's default for the budget);
    threads: the plans' (1 is also how an older checkout's policies, which take no count, plan)."""
    rng = np.random.default_rng(seed)
    pol = make_policy(policy)
    assert pol is not None, "a policy that plans"
    slot_o = 2 * n_head_kv * head_dim * 2  # K and V of all KV heads, f16
    slot_q = 2 * n_head_kv * head_dim // 32 * 18  # q4_0
    budget_tokens = int(fraction * depth)
    pol.slack = slack or defaults.slack_for(budget_tokens)  # as Llama sets it
    budget = Budget(budget_tokens * slot_o, slot_o, slot_q, cap_s=depth + n_decode)
    chunk = pol.read_chunk(budget_tokens)
    empty = np.zeros((0, n_head_kv), np.int32)
    pools = [{"o": empty, "q": empty, "s": empty} for _ in range(n_layer)]
    stats = rng.random((n_layer, 3))
    times: list[float] = []
    n_read, n_prompt_plans = 0, 0
    while n_read < depth + n_decode:
        prompt = n_read < depth
        n = min(chunk, depth - n_read) if prompt else min(pol.slack, depth + n_decode - n_read)
        if n_read:  # room for the chunk (the first fits the empty cache)
            view = _view(pools, rng, stats, n_read - 1, depth + n_decode,
                         min(chunk, defaults.OBSERVE) if prompt else pol.slack)
            t0 = time.perf_counter()
            plan = pol.plan(view, budget, n, **({"threads": threads} if threads > 1 else {}))
            times.append(time.perf_counter() - t0)
            n_prompt_plans += prompt
            pol.planned(True)
            pools = [_apply(lp, lv) for lp, lv in zip(plan, view.layers, strict=True)]
        new = np.repeat(np.arange(n_read, n_read + n, dtype=np.int32)[:, None], n_head_kv, 1)
        for p in pools:
            p["o"] = np.concatenate([p["o"], new])
        n_read += n
    last = pools[0]
    prompt, decode = times[:n_prompt_plans], times[n_prompt_plans:]
    return dict(policy=policy, depth=depth, fraction=fraction, chunk=chunk, slack=pol.slack,
                threads=threads,
                plans=len(prompt),
                prompt_s=round(sum(prompt), 3), last_prompt_ms=round(1e3 * prompt[-1], 1),
                decode_plans=len(decode),
                decode_ms_per_plan=round(1e3 * float(np.mean(decode)), 1) if decode else None,
                rows=dict(o=len(last["o"]), q=len(last["q"]), s=len(last["s"])))


def _view(pools: list[dict[str, np.ndarray]], rng: np.random.Generator, stats: np.ndarray,
          pos_max: int, n_positions: int, n_queries: int) -> KVView:
    def mass(a: np.ndarray) -> np.ndarray:
        return rng.random(a.shape, dtype=np.float32)

    layers = []
    for p in pools:
        m = {k: mass(p[k]) for k in "oqs"}
        layers.append(LayerView(p["o"], p["q"], m["o"], m["o"] ** 2, m["q"], m["q"] ** 2,
                                p["s"], m["s"], m["s"] ** 2))
    return KVView(layers, n_queries=n_queries, group=4, stats=stats, pos_max=pos_max,
                  n_positions=n_positions)


def _apply(lp: Any, lv: LayerView) -> dict[str, np.ndarray]:
    """The positions each slot holds once the plan is applied."""
    src = {POOL_O: lv.pos_o, POOL_Q: lv.pos_q, POOL_S: lv.pos_s}

    def take(rows: np.ndarray, frm: np.ndarray) -> np.ndarray:
        out = np.empty(rows.shape, np.int32)
        for pool, pos in src.items():
            sel = frm == pool
            if sel.any():
                out[sel] = np.take_along_axis(pos, np.where(sel, rows, 0), 0)[sel]
        return out

    o_from = np.full_like(lp.o_src, POOL_O) if lp.o_from is None else lp.o_from
    return {"o": take(lp.o_src, o_from), "q": take(lp.q_src, lp.q_from),
            "s": take(lp.s_src, lp.s_from)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", nargs="+", default=["quant", "arkv"])
    p.add_argument("--depths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--fraction", type=float, default=0.25, help="budget, of the f16 bytes")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decode", type=int, default=0, help="tokens decoded after the prompt")
    p.add_argument("--slack", type=int, default=0,
                   help="the policy's slack (default: Llama's for the budget)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="plan threads (default: Llama's, n_threads_batch: every core)")


def plans(args: argparse.Namespace) -> None:
    """Print one JSON line per (policy, depth)."""
    for depth in args.depths:
        for policy in args.policies:
            print(json.dumps(simulate(policy, depth, args.fraction, args.layers, args.heads,
                                      args.head_dim, args.decode, args.slack,
                                      threads=args.threads)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    plans(parser.parse_args())
