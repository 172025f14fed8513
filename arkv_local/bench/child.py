"""One benchmark configuration, run in its own process (`python -m arkv_local.bench _one JSON`).

A configuration is a dict: name, kind ("f16", "llama_q8_0", "llama_q4_0" or a policy name),
fraction (of the f16 bytes of the text, policies only). The child prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..llama import Llama
from ..models import model_shape

LLAMA_TYPES = {"llama_q8_0": (8, 34), "llama_q4_0": (2, 18)}  # ggml type, bytes per 32 values
CHUNK = 256


def peak_rss() -> int:
    """Peak resident set size of this process, bytes (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def open_config(cfg: dict[str, Any], model: str, n_ctx: int, budget_tokens: int,
                **kw: Any) -> Llama:
    """A Llama for one configuration; policies get kv_budget = budget_tokens."""
    common: dict[str, Any] = dict(n_ctx=n_ctx, n_threads=cfg.get("threads", 2), verbose=False,
                                  n_gpu_layers=cfg.get("n_gpu_layers", 0),
                                  flash_attn=cfg.get("flash_attn", True), **kw)
    kind = cfg["kind"]
    if kind == "f16":
        return Llama(model, **common)
    if kind in LLAMA_TYPES:
        t = LLAMA_TYPES[kind][0]
        return Llama(model, type_k=t, type_v=t, **common)
    return Llama(model, kv_policy=kind, kv_budget=budget_tokens, **cfg.get("knobs", {}), **common)


def kv_bytes(cfg: dict[str, Any], llm: Llama, model: str) -> int:
    """KV bytes held now: kv_stats() for f16 and policies; computed for llama.cpp's types."""
    if cfg["kind"] in LLAMA_TYPES:
        shape = model_shape(model)
        values = shape.f16_slot_bytes // 2  # K+V values per token and layer
        return llm.n_tokens * shape.n_layer * values // 32 * LLAMA_TYPES[cfg["kind"]][1]
    return llm.kv_stats().bytes_used


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32."""
    x = x.astype(np.float32)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def fidelity(cfg: dict[str, Any]) -> dict[str, Any]:
    """Stream the text in chunks; KLD/top-1/perplexity against the stored reference logits."""
    model, toks = cfg["model"], cfg["tokens"]
    n = len(toks)
    budget = max(1, int(cfg.get("fraction", 1.0) * n))
    llm = open_config(cfg, model, n, budget, logits_all=True, n_batch=CHUNK)
    t0 = time.perf_counter()
    for i in range(0, n, CHUNK):
        llm.eval(toks[i : i + CHUNK])
    seconds = time.perf_counter() - t0
    rss = peak_rss()
    stats = llm.kv_stats() if cfg["kind"] not in LLAMA_TYPES else None
    out: dict[str, Any] = dict(cfg=cfg["name"], kv_bytes=kv_bytes(cfg, llm, model),
                               budget_bytes=budget * model_shape(model).f16_slot_bytes
                               * model_shape(model).n_layer if "fraction" in cfg else None,
                               peak_rss=rss, seconds=seconds)
    if stats is not None:
        out["layers"] = [dict(o=s.n_o, q=s.n_q, s=s.n_s, e=s.n_e, oq=s.oq_ratio)
                         for s in stats.layers]
        out["tailoring_seconds"] = stats.tailoring_seconds
    logits = np.asarray(llm.scores[:n], dtype=np.float16)  # both sides rounded alike
    llm.close()
    ref_path = Path(cfg["ref"])
    if cfg.get("write_ref"):
        np.save(ref_path, logits)
    ref = np.load(ref_path, mmap_mode="r")
    target = np.asarray(toks[1:])
    kld, same, nll = 0.0, 0, 0.0
    for a in range(0, n - 1, CHUNK):
        b = min(a + CHUNK, n - 1)
        lp, lq = log_softmax(np.asarray(ref[a:b])), log_softmax(logits[a:b])
        kld += float((np.exp(lp) * (lp - lq)).sum())
        same += int((lp.argmax(1) == lq.argmax(1)).sum())
        nll -= float(lq[np.arange(b - a), target[a:b]].sum())
    out.update(kld=kld / (n - 1), same_top1=same / (n - 1), ppl=float(np.exp(nll / (n - 1))))
    return out


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(llm: Llama, n_tokens: int, needles: list[tuple[float, str]],
                   question: str, haystack: str | None = None,
                   rng: np.random.Generator | None = None) -> str:
    """About n_tokens tokens of filler with each needle's sentence at its depth, then the
    question. The filler repeats FILLER, or is a window of haystack's words that starts at a
    word drawn from rng (a real text: nothing makes the needle stand out but its content)."""
    if haystack is None:
        reps = max(1, n_tokens // len(llm.tokenize(FILLER.encode(), add_bos=False)))
        units, sep = [FILLER] * reps, ""
    else:
        words = haystack.split()

        def tokens(ws: list[str]) -> float:  # per word
            return len(llm.tokenize(" ".join(ws).encode(), add_bos=False)) / max(1, len(ws))

        n_words = max(1, int(n_tokens / tokens(words[:2000])))
        if n_words > len(words):
            raise ValueError(f"the haystack has {len(words)} words, fewer than the "
                             f"{n_words} that {n_tokens} tokens take")
        start = int((rng or np.random.default_rng(0)).integers(0, len(words) - n_words + 1))
        # the window's own tokens per word (the sample's may differ)
        n_words = min(len(words) - start,
                      max(1, int(n_tokens / tokens(words[start:start + n_words]))))
        units, sep = words[start:start + n_words], " "
    parts, done = [], 0
    for depth, sentence in sorted(needles):
        cut = int(len(units) * depth)
        parts += [sep.join(units[done:cut]), sentence]
        done = cut
    parts.append(sep.join(units[done:]))
    return ("There is a pass key hidden in the following text. Find it and remember it. "
            + sep.join(parts) + "\n" + question)


def passkey(cfg: dict[str, Any]) -> dict[str, Any]:
    """Passkey trials (length, depth) for one configuration: answers and whether each is right.
    Per length, one more trial for each pair of depths in cfg["pairs"] holds two keys there
    and asks for both."""
    model = cfg["model"]
    rng = np.random.default_rng(cfg.get("seed", 0))
    haystack = Path(cfg["haystack"]).read_text() if cfg.get("haystack") else None
    trials = []
    for length in cfg["lengths"]:
        for depth in cfg["depths"] + [tuple(p) for p in cfg.get("pairs", [])]:
            two = isinstance(depth, tuple)
            keys = [int(k) for k in rng.integers(10000, 100000, 2 if two else 1)]
            if two:
                needles = [(depth[0], f"The first pass key is {keys[0]}. Remember it. "),
                           (depth[1], f"The second pass key is {keys[1]}. Remember it. ")]
                question = "What are the two pass keys? Answer with the two numbers only."
            else:
                needles = [(depth, f"The pass key is {keys[0]}. Remember it. "
                                   f"{keys[0]} is the pass key. ")]
                question = "What is the pass key? Answer with the number only."
            llm = open_config(cfg, model, length + 256, int(cfg.get("fraction", 1.0) * length))
            prompt = passkey_prompt(llm, length, needles, question, haystack, rng)
            r = llm.create_chat_completion([{"role": "user", "content": prompt}],
                                           temperature=0.0, max_tokens=12 * len(keys))
            answer = r["choices"][0]["message"]["content"] or ""
            trials.append(dict(length=length, depth=list(depth) if two else depth, key=keys,
                               answer=answer,
                               n_prompt=r["usage"]["prompt_tokens"],
                               ok=all(str(k) in answer for k in keys)))
            llm.close()
    return dict(cfg=cfg["name"], trials=trials, peak_rss=peak_rss(),
                accuracy=sum(t["ok"] for t in trials) / len(trials))


def speed(cfg: dict[str, Any]) -> dict[str, Any]:
    """Prefill `depth` tokens, decode n_gen one by one: tok/s of each, and the plans made in
    each phase (count and seconds)."""
    from .speed import timed

    model, depth, n_gen = cfg["model"], cfg["depth"], cfg["n_gen"]
    llm = open_config(cfg, model, depth + n_gen + 256, int(cfg.get("fraction", 1.0) * depth),
                      n_batch=512)
    prefill_stats: list[Any] = []
    prefill, decode = timed(llm, depth, n_gen, partial(
        lambda out, m: out.append(m.kv_stats()), prefill_stats, llm))
    end, start = llm.kv_stats(), prefill_stats[0]
    llm.close()
    return dict(cfg=cfg["name"], depth=depth, n_gen=n_gen, peak_rss=peak_rss(),
                prefill=prefill, decode=decode, prefill_plans=start.n_tailorings,
                prefill_plan_seconds=start.tailoring_seconds,
                decode_plans=end.n_tailorings - start.n_tailorings,
                decode_plan_seconds=end.tailoring_seconds - start.tailoring_seconds)


def run_one(spec: str) -> int:
    """Entry of `_one`: run the task named in the JSON spec and print its result as JSON."""
    cfg = json.loads(spec)
    task = {"fidelity": fidelity, "passkey": passkey, "speed": speed}[cfg["task"]]
    print(json.dumps(task(cfg)), flush=True)
    return 0
