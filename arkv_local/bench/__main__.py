"""`python -m arkv_local.bench`: `speed` (tok/s, tri-state vs stock), `run` (the suite:
fidelity, passkey, memory, speed, plots and docs/BENCHMARKS.md), `soak` (a long chat past
the context window: memory and time per turn) and `plans` (a policy's planning time at a
model's shape, without the model)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    p = argparse.ArgumentParser(prog="python -m arkv_local.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="prefill/decode tokens/s, tri-state memory vs stock f16")
    s.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    s.add_argument("--depths", type=int, nargs="+", default=[512, 4096])
    s.add_argument("--n-gen", type=int, default=64)
    s.add_argument("--repeat", type=int, default=3, help="runs per configuration (best kept)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--flash-attn", choices=["on", "off"], default="on")
    s.add_argument("--n-gpu-layers", type=int, default=0)
    r = sub.add_parser("run", help="the benchmark suite: tables, plots, BENCHMARKS.md")
    r.add_argument("--quick", action="store_true", help="a small suite for CI (< 90 s)")
    r.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    r.add_argument("--out", default="docs", help="folder for BENCHMARKS.md and the plots")
    r.add_argument("--n-text", type=int, help="tokens of text for fidelity (4096; quick 400)")
    r.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 7800])
    r.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    r.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    r.add_argument("--passkey-pairs", nargs="+", default=["0.25/0.75"],
                   help="depths of the two keys of a two-key prompt, one prompt per pair and "
                        "length (e.g. 0.1/0.6 0.25/0.75)")
    r.add_argument("--passkey-text", metavar="FILE",
                   help="a text file whose words make the haystack (a window from a seeded word) "
                        "instead of the repeated filler sentences")
    r.add_argument("--passkey-configs", nargs="+",
                   help="passkey rows to run, by name (e.g. full arkv@12.5%%; default: all)")
    r.add_argument("--speed-configs", nargs="+", default=["full", "quant", "window", "h2o",
                                                          "arkv"])
    r.add_argument("--speed-depths", type=int, nargs="+", default=[4096, 8000])
    r.add_argument("--speed-n-gen", type=int, default=256,
                   help="tokens decoded per speed run (more than kv_slack: plans while decoding)")
    r.add_argument("--speed-flash-attn", choices=["on", "off"], default="on",
                   help="flash attention in the speed runs (llama-cpp-python's default is off)")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded (GPU builds)")
    r.add_argument("--repeat", type=int, default=2, help="speed runs per configuration")
    r.add_argument("--skip", nargs="*", default=[], choices=["fidelity", "passkey", "speed"],
                   help="sections to leave out")
    k = sub.add_parser("soak", help="a long chat past the window: memory and time per turn")
    k.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    k.add_argument("--policy", default="arkv")
    k.add_argument("--kv-budget", type=int, default=256, help="KV memory in f16 tokens")
    k.add_argument("--n-ctx", type=int, default=0, help="window (0: the trained length)")
    k.add_argument("--tokens", type=int, default=100_000, help="answer tokens in all")
    k.add_argument("--max-tokens", type=int, default=256, help="longest answer per turn")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--every", type=int, default=20, help="print a line every this many turns")
    k.add_argument("--ignore-eos", action="store_true",
                   help="never sample end-of-text: every answer runs to --max-tokens")
    k.add_argument("--kv-spill", choices=["host", "disk", "none"], default="host",
                   help="where rows leaving the budget go (none: evicted)")
    k.add_argument("--history", choices=["chat", "resend"], default="chat",
                   help="chat: each turn reads only the new turn, as arkv-chat; resend: every "
                        "turn sends the whole conversation (create_chat_completion, as "
                        "OpenAI-style clients and arkv-server)")
    from .plans import add_arguments

    add_arguments(sub.add_parser("plans", help="a policy's planning time at a model's shape, "
                                               "on a simulated cache (numpy only)"))
    o = sub.add_parser("_one", help=argparse.SUPPRESS)
    o.add_argument("spec")
    args = p.parse_args(argv)
    if args.cmd == "run" and args.passkey_text and not os.path.isfile(args.passkey_text):
        p.error(f"--passkey-text: no such file: {args.passkey_text!r}")
    if args.cmd == "speed":
        from .speed import speed

        speed(args)
        return 0
    if args.cmd == "soak":
        from .soak import soak

        soak(args)
        return 0
    if args.cmd == "plans":
        from .plans import plans

        plans(args)
        return 0
    if args.cmd == "_one":
        from .child import run_one

        return run_one(args.spec)
    from .suite import run

    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
