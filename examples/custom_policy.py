"""A custom KV policy is one small class: here, newest tokens first, with a fixed f16 share.

    python examples/custom_policy.py
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arkv_local import Llama, Policy
from arkv_local.policies import KVView


@dataclass
class Recency(Policy):
    """The newest tokens stay in f16, the next ones go to 4 bits, the oldest are evicted.

    o_share: per layer, the share of the budget (beyond the window) kept in f16.
    """

    o_share: float = 0.3

    def ratios(self, view: KVView) -> np.ndarray:
        return np.full(len(view.layers), self.o_share)

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        return view.layers[layer].pos.astype(float)


def main() -> None:
    llm = Llama(kv_policy=Recency(o_share=0.3), kv_budget=256, verbose=False)
    prompt = "A short history of the printing press, in many details. " * 40
    print(llm(prompt, max_tokens=48, temperature=0.2)["choices"][0]["text"])
    stats = llm.kv_stats()
    print(f"KV memory {stats.bytes_used / 2**20:.1f} MiB for {stats.n_tokens} tokens "
          f"(f16 would need {stats.bytes_f16 / 2**20:.1f} MiB); layer 0: {stats.layers[0]}")


if __name__ == "__main__":
    main()
