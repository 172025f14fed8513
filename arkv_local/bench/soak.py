"""`soak`: a long chat under a policy, past the context window many times: memory and time per
turn as it goes (KV bytes and peak RSS should stay flat, seconds per turn steady)."""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from typing import Any

import numpy as np
from llama_cpp import LogitsProcessorList

from .. import arkv_cpp
from ..llama import Llama
from ..models import default_model_path
from ..turns import Turns

TOPICS = ["rivers", "compilers", "bread", "the moon", "chess", "bees", "trains", "glass",
          "volcanoes", "libraries", "tea", "bridges", "clocks", "salt", "owls", "maps"]


def rss_mib() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process."""
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * resource.getpagesize()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return resident / 2**20, peak_kib / 2**10


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def memory_parts() -> dict[str, float]:
    """Where resident memory is, to attribute growth: anonymous and file-backed resident MiB
    (/proc), bytes malloc has handed out (glibc's mallinfo2; 0 elsewhere) and Python's
    allocated blocks, in thousands."""
    parts = {"anon": 0.0, "file": 0.0, "heap": 0.0, "py_kblocks": sys.getallocatedblocks() / 1e3}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                parts[key[3:].lower()] = int(value.split()[0]) / 2**10
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        parts["heap"] = (info.uordblks + info.hblkhd) / 2**20
    except (AttributeError, OSError):
        pass
    return parts


def soak(args: argparse.Namespace) -> None:
    """Chat until args.tokens answer tokens are generated; print a line every args.every turns
    and a summary comparing the first thousand tokens with the rest."""
    spill = None if args.kv_spill == "none" else args.kv_spill
    llm = Llama(args.model or str(default_model_path()), kv_policy=args.policy,
                kv_budget=args.kv_budget, kv_spill=spill, n_ctx=args.n_ctx,
                n_threads=args.threads, seed=0, verbose=False)
    # an answer that ends at once would make a long soak of short turns: end-of-text kept out
    bias = {llm.token_eos(): float("-inf")} if args.ignore_eos else None
    print(f"soak: {args.policy}, kv_budget {args.kv_budget} f16 tokens, spill {args.kv_spill}, "
          f"window {llm.n_ctx()}, history {args.history}, "
          f"{args.tokens} answer tokens, {args.max_tokens} per turn at most"
          f"{', end of text never sampled' if args.ignore_eos else ''}")
    print(f"{'turn':>5} {'answer tok':>10} {'seen tok':>9} {'shifts':>6} {'s/turn':>7} "
          f"{'KV MiB':>7} {'spill MiB':>9} {'RSS MiB':>8} {'peak MiB':>8} {'anon MiB':>8} "
          f"{'file MiB':>8} {'heap MiB':>8} {'py kblk':>7} {'comp MiB':>8}")
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    turns = Turns(llm) if args.history == "chat" else None
    processors = None
    if bias:  # as logit_bias does in create_chat_completion
        ids, values = np.array(list(bias)), np.array(list(bias.values()), np.float32)

        def biased(_: Any, logits: np.ndarray) -> np.ndarray:
            logits[ids] += values
            return logits

        processors = LogitsProcessorList([biased])
    generated, turn, rows = 0, 0, []
    while generated < args.tokens:
        topic = TOPICS[turn % len(TOPICS)]
        user = {"role": "user", "content": f"Tell me one more thing about {topic}."}
        messages.append(user)
        t0 = time.perf_counter()
        if turns is not None:  # as arkv-chat: only the new turn is tokenized and read
            answer = list(turns.answer(turns.prompt(messages), args.max_tokens, seed=turn,
                                       temp=0.8, logits_processor=processors))
            messages.append({"role": "assistant", "content": "".join(answer)})
            generated += turns.n_answer
        else:
            out = llm.create_chat_completion(messages, max_tokens=args.max_tokens,
                                             temperature=0.8, seed=turn, logit_bias=bias)
            messages.append(out["choices"][0]["message"])
            generated += out["usage"]["completion_tokens"]
        seconds = time.perf_counter() - t0
        stats = llm.kv_stats()
        rss, peak = rss_mib()
        rows.append((generated, seconds, stats.bytes_used, peak))
        turn += 1
        if turn % args.every == 0 or generated >= args.tokens:
            m = memory_parts()
            print(f"{turn:>5} {generated:>10} {stats.n_tokens:>9} {stats.n_shifts:>6} "
                  f"{seconds:>7.2f} {stats.bytes_used / 2**20:>7.2f} "
                  f"{stats.bytes_spill / 2**20:>9.2f} {rss:>8.1f} {peak:>8.1f} "
                  f"{m['anon']:>8.1f} {m['file']:>8.1f} {m['heap']:>8.1f} {m['py_kblocks']:>7.0f} "
                  f"{arkv_cpp.llama_arkv_compute_bytes(llm.ctx) / 2**20:>8.1f}",
                  flush=True)
    after = [r for r in rows if r[0] > 1000]
    if after:
        first, last = after[: max(1, len(after) // 10)], after[-max(1, len(after) // 10) :]
        print(f"after the first 1000 tokens: KV bytes {min(r[2] for r in after)} to "
              f"{max(r[2] for r in after)}; peak RSS {after[0][3]:.1f} -> {after[-1][3]:.1f} MiB; "
              f"s/turn first tenth {sum(r[1] for r in first) / len(first):.2f}, "
              f"last tenth {sum(r[1] for r in last) / len(last):.2f}")
