"""A seeded random walk over llama-cpp-python's API under every policy, at a budget far below
the history and one above it: completions with fresh and shared prefixes, chat turns, reset(),
save/load, LlamaRAMCache and pickle. After every step the KV bytes stay within the budget and
kv_stats() agrees with the native counts; where the cache holds everything, greedy answers equal
those of a fresh object given the same history. (Not always llama.cpp's own cache's: a decoded
token's fused CPU kernel rounds otherwise, up to ~1e-4 of a logit, which flips a greedy choice
where two logits tie that closely; test_reference.py holds those logits to llama.cpp's.)"""

from __future__ import annotations

import pickle
import zlib
from contextlib import closing

import llama_cpp
import numpy as np
import pytest

from arkv_local import Llama
from arkv_local.memory import TriStateKV
from arkv_local.tiny_models import tiny_model_path

STEPS = 40
N_CTX = 2048
KNOBS = dict(kv_window=16, kv_slack=16, kv_rotate=False)  # unrotated: "full"'s exact logits
COMMON = dict(n_ctx=N_CTX, n_threads=2, verbose=False)
ACTIONS = ["fresh", "shared", "shared", "chat", "chat", "reset", "save_load", "pickle"]


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_model_path("llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256))


def check_memory(llm: Llama) -> None:
    """Within budget, and kv_stats() as the native memory counts."""
    st = llm.kv_stats()
    assert st.bytes_used <= st.bytes_budget
    native = TriStateKV(llm.ctx).layers()
    assert st.bytes_used == sum(i.bytes_used for i in native)
    for layer, info in zip(st.layers, native, strict=True):
        assert (layer.n_o, layer.n_q) == (info.n_o, info.n_q)
        assert layer.n_e >= 0 and layer.n_o + layer.n_q + layer.n_s + layer.n_e == st.n_tokens


class Walk:
    """One policy at one budget; `holds_all`: the budget exceeds any history of the walk."""

    def __init__(self, model: str, policy: str, budget: int, seed: int) -> None:
        self.model, self.policy, self.budget = model, policy, budget
        self.holds_all = budget > N_CTX
        self.rng = np.random.default_rng(seed)
        self.llm = self.new()
        self.llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=64 << 20))
        self.prompt: list[int] = []
        self.messages: list[dict[str, str]] = []
        self.counts: dict[str, int] = {}
        self.tailored = False

    def new(self) -> Llama:
        return Llama(self.model, kv_policy=self.policy, kv_budget=self.budget, **KNOBS, **COMMON)

    def tokens(self, lo: int, hi: int) -> list[int]:
        return self.rng.integers(0, 250, int(self.rng.integers(lo, hi))).tolist()

    def complete(self, prompt: list[int]) -> None:
        self.prompt = prompt
        got = self.llm.create_completion(prompt, max_tokens=8, temperature=0.0)
        if self.holds_all:
            with closing(self.new()) as fresh:
                want = fresh.create_completion(prompt, max_tokens=8, temperature=0.0)
            assert got["choices"][0]["text"] == want["choices"][0]["text"]

    def chat(self) -> None:
        words = " ".join(f"w{w}" for w in self.rng.integers(0, 99, int(self.rng.integers(3, 40))))
        if len(self.messages) > 12:
            self.messages = []
        self.messages.append({"role": "user", "content": words})
        got = self.llm.create_chat_completion(self.messages, max_tokens=8, temperature=0.0)
        answer = got["choices"][0]["message"]["content"] or ""
        if self.holds_all:
            with closing(self.new()) as fresh:
                want = fresh.create_chat_completion(self.messages, max_tokens=8, temperature=0.0)
            assert answer == (want["choices"][0]["message"]["content"] or "")
        self.messages.append({"role": "assistant", "content": answer})

    def step(self, action: str) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1
        if action == "fresh" or (action == "shared" and not self.prompt):
            self.complete(self.tokens(20, 300))
        elif action == "shared":  # the cached prefix is reused (or re-read once tailored)
            keep = int(self.rng.integers(1, len(self.prompt) + 1))
            self.complete((self.prompt[:keep] + self.tokens(1, 200))[: N_CTX - 64])
        elif action == "chat":
            self.chat()
        elif action == "reset":
            self.llm.reset()
        elif action == "save_load":
            state = self.llm.save_state()
            self.complete(self.tokens(20, 200))  # something else in between
            self.llm.load_state(state)
            assert self.llm.n_tokens == state.n_tokens
            self.prompt = self.llm.input_ids[: self.llm.n_tokens].tolist()
        elif action == "pickle":
            copy = pickle.loads(pickle.dumps(self.llm))
            assert copy.kv_policy == self.policy
            assert copy.kv_stats().bytes_budget == self.llm.kv_stats().bytes_budget
            self.llm.close()
            self.llm, self.prompt = copy, []
        check_memory(self.llm)
        self.tailored = self.tailored or self.llm.kv_stats().n_tailorings > 0


@pytest.mark.parametrize("budget", [64, 4096])
@pytest.mark.parametrize("policy", ["arkv", "h2o", "window", "quant"])
def test_random_walk_over_the_api(model: str, policy: str, budget: int) -> None:
    walk = Walk(model, policy, budget, seed=zlib.crc32(f"{policy}{budget}".encode()))
    for _ in range(STEPS):
        walk.step(str(walk.rng.choice(ACTIONS)))
    assert set(walk.counts) == set(ACTIONS), walk.counts  # every kind of step was taken
    assert walk.tailored == (budget < N_CTX)  # the small budget was exceeded, the large never
