"""`python -m arkv_local.bench run`: fidelity, passkey, memory and speed of every KV cache,
each configuration in its own process; prints tables, writes plots and BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..models import default_model_path, model_shape

POLICIES = ["quant", "window", "h2o", "arkv"]
FRACTIONS = [0.5, 0.25, 0.125]


def prose_text() -> str:
    """Python's reference docs (pydoc_data.topics, PSF license), topics in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh process and return its JSON result."""
    cmd = [sys.executable, "-m", "arkv_local.bench", "_one", json.dumps(spec)]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if p.returncode != 0:
        raise RuntimeError(f"{spec['task']} {spec['name']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fidelity_configs(quick: bool, fractions: list[float]) -> list[dict[str, Any]]:
    """The reference (f16) first, then llama.cpp's quantized caches, then policies x fractions."""
    if quick:
        return [dict(name="full", kind="f16"), dict(name="q4_0", kind="llama_q4_0"),
                dict(name="window@25%", kind="window", fraction=0.25),
                dict(name="arkv@25%", kind="arkv", fraction=0.25)]
    cfgs = [dict(name="full", kind="f16"), dict(name="q8_0", kind="llama_q8_0"),
            dict(name="q4_0", kind="llama_q4_0")]
    cfgs += [dict(name=f"{p}@{f:.1%}".replace(".0%", "%"), kind=p, fraction=f)
             for f in fractions for p in POLICIES]
    return cfgs


def mib(n: float | None) -> str:
    """Bytes as MiB with two decimals ('-' for None)."""
    return "-" if n is None else f"{n / 2**20:.2f}"


class Report:
    """Markdown lines, printed as they come."""

    def __init__(self, path: Path) -> None:
        self.lines: list[str] = []
        self.path = path

    def add(self, *lines: str) -> None:
        """Append lines to the report, print them, and rewrite the file (partial runs stay)."""
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        self.path.write_text("\n".join(self.lines) + "\n")


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The whole suite; returns the exit status."""
    import llama_cpp

    t_start = time.perf_counter()
    model = args.model or str(default_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = model_shape(model)
    f16_token = shape.f16_slot_bytes * shape.n_layer
    n_text = args.n_text or (400 if args.quick else 4096)
    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    toks = vocab.tokenize(prose_text().encode())[:n_text]
    vocab.close()
    n_text = len(toks)
    cmdline = "python -m arkv_local.bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rep = Report(out / "BENCHMARKS.md")
    rep.add("# Benchmarks", "",
            f"Produced by `{cmdline}` (from the repository root, with `.venv/bin/python`).", "",
            f"- machine: {os.cpu_count()} cores, `{platform.processor() or platform.machine()}`, "
            f"{platform.system()} {platform.release()}; {args.threads} threads",
            f"- model: `{Path(model).name}` ({shape.arch}, {shape.n_layer} layers, "
            f"{shape.n_head_kv} KV heads x {shape.head_dim}); f16 KV: {f16_token} bytes/token",
            f"- Python {platform.python_version()} (text: its `pydoc_data.topics`, "
            f"first {n_text} tokens)",
            "- every configuration runs in its own process; flash attention on (speed: "
            f"{args.speed_flash_attn})", "")

    # 1 + 3. fidelity and memory
    tmp = tempfile.mkdtemp(prefix="arkv_bench_")
    ref = str(Path(tmp) / "ref.npy")
    rep.add("## Fidelity and memory", "",
            f"The text is streamed in chunks of 256 tokens (`eval`, `logits_all=True`, "
            f"`n_ctx={n_text}`), so policies tailor the cache as it grows. Each position's "
            "next-token distribution is compared with the f16 cache's (logits of both rounded "
            "to float16): mean KL divergence, share of equal top-1 tokens, perplexity of the "
            "text. Policies get `kv_budget` = fraction x text tokens (equal KV memory). KV bytes: "
            "`kv_stats().bytes_used` (llama.cpp's q8_0/q4_0: n_tokens x n_layer x K+V values "
            "x 34 or 18 bytes per 32). Peak RSS of the child process includes the logits "
            f"buffer of `logits_all` ({n_text} x {vocab_size(model)} float32) in every row.", "",
            "| config | KV MiB | budget MiB | vs f16 | mean KLD | same top-1 | ppl | "
            "peak RSS MiB | tailoring s |",
            "|---|---|---|---|---|---|---|---|---|")
    fid: dict[str, dict[str, Any]] = {}
    try:
        for cfg in fidelity_configs(args.quick, args.fractions) * ("fidelity" not in args.skip):
            spec = dict(cfg, task="fidelity", model=model, tokens=toks, ref=ref,
                        threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                        write_ref=cfg["kind"] == "f16")
            r = fid[cfg["name"]] = child(spec) | {"kind": cfg["kind"],
                                                  "fraction": cfg.get("fraction")}
            ratio = n_text * f16_token / r["kv_bytes"] if r["kv_bytes"] else float("inf")
            rep.add(f"| {cfg['name']} | {mib(r['kv_bytes'])} | {mib(r['budget_bytes'])} | "
                    f"{ratio:.2f}x | {r['kld']:.4g} | {r['same_top1']:.1%} | {r['ppl']:.2f} | "
                    f"{mib(r['peak_rss'])} | {r.get('tailoring_seconds', 0.0):.2f} |")
    finally:
        Path(ref).unlink(missing_ok=True)
        os.rmdir(tmp)
    rep.add("")

    # 5. plots
    if fid:
        plots(rep, fid, n_text, out)

    # 2. passkey
    pk: dict[str, dict[str, Any]] = {}
    if "passkey" not in args.skip:
        lengths, depths = (([400], [0.5]) if args.quick
                            else (args.passkey_lengths, args.passkey_depths))
        pk_cfgs = ([dict(name="full", kind="f16"), dict(name="arkv@25%", kind="arkv",
                                                          fraction=0.25)] if args.quick else
                   [dict(name="full", kind="f16"), dict(name="q4_0", kind="llama_q4_0")]
                   + [dict(name=f"{p}@25%", kind=p, fraction=0.25) for p in POLICIES]
                   + [dict(name=f"{p}@12.5%", kind=p, fraction=0.125) for p in ("arkv", "quant")])
        if args.passkey_configs:
            pk_cfgs = [c for c in pk_cfgs if c["name"] in args.passkey_configs]
        haystack = (f"the words of {Path(args.passkey_text).name} (a window that starts at a "
                    "seeded word)" if args.passkey_text else "filler text")
        rep.add("## Passkey retrieval", "",
                f"A 5-digit key at depths {', '.join(f'{d:.0%}' for d in depths)} of {haystack} "
                f"of about {', '.join(map(str, lengths))} tokens, asked for at the end "
                "with the model's chat template (`create_chat_completion`, temperature 0, "
                "max_tokens 12 per key)" + ("" if args.quick else
                "; per length and pair of depths in --passkey-pairs one more prompt holds two "
                "keys there ('two@A+B%') and asks for both") + ". Policies at 25% or 12.5% of "
                "the f16 bytes of each prompt, "
                "with the default spill (`kv_spill='host'`).", "",
                "| config | accuracy | answers (length/depth: answer) | peak RSS MiB |",
                "|---|---|---|---|")
        for cfg in pk_cfgs:
            pairs = [] if args.quick else [[float(d) for d in p.split("/")]
                                           for p in args.passkey_pairs]
            r = pk[cfg["name"]] = child(dict(cfg, task="passkey", model=model, lengths=lengths,
                                             depths=depths, pairs=pairs, threads=args.threads,
                                             haystack=args.passkey_text and str(
                                                 Path(args.passkey_text).resolve()),
                                             n_gpu_layers=args.n_gpu_layers))
            answers = "; ".join(
                f"{t['length']}/{depth_label(t['depth'])}"
                f": {'ok' if t['ok'] else repr(t['answer'].strip()[:20])}" for t in r["trials"])
            rep.add(f"| {cfg['name']} | {r['accuracy']:.0%} | {answers.replace('|', '/')} | "
                    f"{mib(r['peak_rss'])} |")
        rep.add("")

    # 4. speed
    sp: dict[tuple[str, int], dict[str, Any]] = {}
    if not args.quick and "speed" not in args.skip:
        rep.add("## Speed", "",
                f"Prefill of `depth` tokens (`eval`, n_batch 512) then {args.speed_n_gen} tokens "
                f"decoded one by one, {args.threads} threads, flash attention "
                f"{args.speed_flash_attn}; best of {args.repeat} runs each "
                "(in rounds over all configurations), "
                "against `full` in the same run. Policies at 25% of the f16 bytes of the depth; "
                "`arkv@none`: a budget above the text (nothing evicted). Plans while decoding "
                "(count per 1k decoded tokens, and ms each, moving the rows included) are those "
                "of the run with the best decode (`kv_stats()`).", "",
                "| depth | config | prefill tok/s | x full | decode tok/s | x full | "
                "plans in prefill | plans per 1k decoded | ms per plan |",
                "|---|---|---|---|---|---|---|---|---|")
        configs = [dict(name="full", kind="f16")] * ("full" in args.speed_configs) + [
            dict(name=f"{p}@25%", kind=p, fraction=0.25) for p in POLICIES
            if p in args.speed_configs] + [dict(name="arkv@none", kind="arkv", fraction=1.25)]
        for depth in args.speed_depths:
            # rounds over every configuration: a shared machine's slow minutes hit all alike
            for _ in range(args.repeat):
                for cfg in configs:
                    r = child(dict(cfg, task="speed", model=model, depth=depth,
                                   n_gen=args.speed_n_gen, threads=args.threads,
                                   n_gpu_layers=args.n_gpu_layers,
                                   flash_attn=args.speed_flash_attn == "on"))
                    sp[cfg["name"], depth] = best_speed(sp.get((cfg["name"], depth)), r)
            for cfg in configs:
                r = sp[cfg["name"], depth]
                f = sp.get(("full", depth), r)
                plans = r["decode_plans"]
                rep.add(f"| {depth} | {cfg['name']} | {r['prefill']:.1f} | "
                        f"{r['prefill'] / f['prefill']:.2f} | {r['decode']:.1f} | "
                        f"{r['decode'] / f['decode']:.2f} | {r['prefill_plans']} | "
                        f"{1000 * plans / r['n_gen']:.0f} | "
                        f"{1000 * r['decode_plan_seconds'] / max(plans, 1):.1f} |")
        rep.add("")

    reading(rep, fid, pk, sp)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rep.add("", f"Largest child peak RSS (getrusage RUSAGE_CHILDREN): {children / 1024:.0f} MiB. "
            f"Total time: {time.perf_counter() - t_start:.0f} s.")
    print(f"wrote {out / 'BENCHMARKS.md'}" + (", kld_vs_memory.png, arkv_layers.png" * bool(fid)))
    return 0


def best_speed(best: dict[str, Any] | None, r: dict[str, Any]) -> dict[str, Any]:
    """The best prefill and the best decode of the runs so far; plan counts and seconds are
    those of the run with the best decode."""
    if best is None:
        return r
    out = dict(r if r["decode"] > best["decode"] else best)
    out["prefill"] = max(best["prefill"], r["prefill"])
    return out


def vocab_size(model: str) -> int:
    """The model's vocabulary size (from its tokenizer)."""
    import llama_cpp

    llm = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    n = llm.n_vocab()
    llm.close()
    return n


def depth_label(depth: float | list[float]) -> str:
    """'10%' for one key at 10% depth, 'two@25+75%' for two keys."""
    if isinstance(depth, list):
        return f"two@{depth[0] * 100:.0f}+{depth[1] * 100:.0f}%"
    return f"{depth:.0%}"


def two_key_finds(pk: dict[str, dict[str, Any]], name: str) -> tuple[int, int]:
    """Two-key prompts that `name` answers, of those `full` answers (a pair the model misses
    with every cache says nothing about the cache)."""
    found = {(t["length"], tuple(t["depth"])) for t in pk["full"]["trials"]
             if isinstance(t["depth"], list) and t["ok"]}
    ok = sum(t["ok"] for t in pk[name]["trials"]
             if isinstance(t["depth"], list) and (t["length"], tuple(t["depth"])) in found)
    return ok, len(found)


def reading(rep: Report, fid: dict[str, dict[str, Any]], pk: dict[str, dict[str, Any]],
            sp: dict[tuple[str, int], dict[str, Any]]) -> None:
    """The targets (KLD and passkeys for arkv at 25% and 12.5% of f16 memory, speed against
    full), each said to be met or not, from the numbers."""
    q4 = fid.get("q4_0")
    full = fid.get("full", {})
    rep.add("## Reading", "", "Targets for `arkv` at 25% and 12.5% of the f16 memory:", "")
    for name in ("arkv@25%", "arkv@12.5%"):
        r = fid.get(name)
        if r and q4:
            ok = r["kld"] < q4["kld"]
            rep.add(f"- mean KLD of {name} below llama.cpp's q4_0 cache: "
                    f"**{'met' if ok else 'not met'}** ({r['kld']:.4f} at "
                    f"{full['kv_bytes'] / r['kv_bytes']:.2f}x less KV memory; q4_0 "
                    f"{q4['kld']:.4f} at {full['kv_bytes'] / q4['kv_bytes']:.2f}x).")
    if pk:
        for name in ("arkv@25%", "arkv@12.5%"):
            if name in pk and "full" in pk:
                ok = pk[name]["accuracy"] >= pk["full"]["accuracy"]
                rep.add(f"- passkey accuracy of {name} equal to full's: "
                        f"**{'met' if ok else 'not met'}** ({pk[name]['accuracy']:.0%}, full "
                        f"{pk['full']['accuracy']:.0%}).")
                ok2, n2 = two_key_finds(pk, name)
                if n2:
                    rep.add(f"- two keys, {name}: {ok2} of the {n2} prompts `full` answers "
                            f"(**{'met' if ok2 == n2 else 'not met'}**).")
    else:
        rep.add("- passkey accuracy: not measured in this run.")
    if sp and ("full", max(k[1] for k in sp)) in sp:
        rep.add("", "Decode and prefill against `full` in the same run (#15's targets):", "")
        for (name, depth), r in sorted(sp.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            f = sp.get(("full", depth))
            if name == "full" or f is None:
                continue
            decode, prefill = r["decode"] / f["decode"], r["prefill"] / f["prefill"]
            want = (0.97, 0.97) if name == "arkv@none" else (1.6 if depth >= 8000 else 1.3, 0.95)
            rep.add(f"- {name} at {depth}: decode {decode:.2f}x (target {want[0]}x: "
                    f"**{'met' if decode >= want[0] else 'not met'}**), prefill {prefill:.2f}x "
                    f"(target {want[1]}x: **{'met' if prefill >= want[1] else 'not met'}**)")
    else:
        rep.add("- decode speed: not measured in this run.")


def plots(rep: Report, fid: dict[str, dict[str, Any]], n_text: int, out: Path) -> None:
    """KLD-vs-memory and ARKV per-layer plots, linked from the report; without matplotlib (an
    optional dependency: the `plot` extra) a one-line hint instead, and the run goes on."""
    try:
        from .plots import plot_kld, plot_layers
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        print("arkv_local.bench: plots skipped: matplotlib is not installed "
              "(pip install 'arkv_local[plot]')", file=sys.stderr)
        return

    arkv_name = "arkv@25%"
    plot_kld(fid, out / "kld_vs_memory.png")
    from ..tailoring import LayerKVStats

    layers = [LayerKVStats(lay["o"], lay["q"], lay["e"], lay["oq"], 0, n_s=lay["s"])
              for lay in fid[arkv_name]["layers"]]
    plot_layers(layers, f"ARKV at 25% of f16 memory, {n_text} tokens", out / "arkv_layers.png")
    rep.add("![mean KLD against KV memory](kld_vs_memory.png)", "",
            "![ARKV at 25%: per-layer OQ ratio and O/Q/S/E counts](arkv_layers.png)", "",
            "ARKV at 25%, per layer (tokens per KV head, O/Q/S/E): "
            + ", ".join(f"L{i} {lay['o']}/{lay['q']}/{lay['s']}/{lay['e']}"
                        for i, lay in enumerate(fid[arkv_name]["layers"])), "")
