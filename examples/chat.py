"""A streaming chat with a live view of KV memory, on the public API (arkv-chat does more).

    python examples/chat.py
"""

from __future__ import annotations

from arkv_local import Llama


def main() -> None:
    llm = Llama(kv_policy="arkv", kv_budget=1024, n_ctx=4096, verbose=False)
    messages: list[dict[str, str]] = []
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        answer = []
        for chunk in llm.create_chat_completion(messages, max_tokens=256, stream=True):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            answer.append(piece)
            print(piece, end="", flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})
        stats = llm.kv_stats()
        print(f"\n[KV {stats.bytes_used / 2**20:.1f} MiB; an f16 cache would hold "
              f"{stats.bytes_f16 / 2**20:.1f} MiB for these {stats.n_tokens} tokens]")


if __name__ == "__main__":
    main()
