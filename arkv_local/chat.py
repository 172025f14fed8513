"""`arkv-chat`: streaming chat with a local GGUF model (default: SmolLM2-135M-Instruct).

With --prompt it answers once and prints only the answer; otherwise each line read from
standard input is a user turn of one conversation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from .llama import KV_POLICIES, Llama


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arkv-chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--policy", default="full", choices=KV_POLICIES, help="KV-cache policy")
    p.add_argument("--kv-budget", type=int, help="KV memory in f16 tokens (default: --ctx)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    p.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (-1: all)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def stream_answer(llm: Llama, messages: list[dict[str, str]], args: argparse.Namespace
                  ) -> Iterator[str]:
    """Yield the assistant's answer piece by piece."""
    for chunk in llm.create_chat_completion(messages, max_tokens=args.max_tokens,
                                            temperature=args.temperature, stream=True):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            yield piece


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llm = Llama(args.model, kv_policy=args.policy, kv_budget=args.kv_budget, n_ctx=args.ctx,
                n_gpu_layers=args.n_gpu_layers, seed=args.seed, verbose=False)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for user in turns:
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        answer = []
        for piece in stream_answer(llm, messages, args):
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
