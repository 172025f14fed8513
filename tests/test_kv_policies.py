"""End to end: `Llama(kv_policy=...)` keeps the KV memory within its budget and stays correct."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import arkv_local
from arkv_local import Llama
from arkv_local.memory import LayerPlan
from arkv_local.policies import KVView, Policy
from arkv_local.tailoring import Tailor
from arkv_local.tiny_models import tiny_model_path

TEXT = inspect.getsource(argparse)


@pytest.fixture(scope="module")
def tokens(smollm2: Path) -> list[int]:
    return Llama(smollm2, n_ctx=64, verbose=False).tokenize(TEXT.encode())


def test_memory_stays_within_budget_over_a_long_prompt_and_generation(
        smollm2: Path, tokens: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 512
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=budget, n_threads=2, verbose=False)
    seen: list[int] = []
    original = Tailor.before_decode

    def record(self: Tailor, n_tokens: int, pos_max: int, n_next: int = 0) -> None:
        original(self, n_tokens, pos_max, n_next)  # every decode but recalls
        seen.append(self.kv_stats(llm.n_tokens).bytes_used)

    monkeypatch.setattr(Tailor, "before_decode", record)
    prompt = tokens[:4000]
    generated = []
    for tok in llm.generate(prompt, temp=0.0):
        generated.append(tok)
        if len(generated) == 500:
            break
    stats = llm.kv_stats()
    limit = budget * arkv_local.models.f16_slot_bytes(smollm2) * 30
    assert stats.bytes_budget == limit and len(seen) >= 500
    assert max(seen) <= limit
    assert stats.n_tokens == 4000 + 499  # the last sampled token is not evaluated yet
    assert stats.bytes_f16 > 8 * limit  # the sequence is far longer than the cache
    assert stats.n_tailorings > 10 and stats.tailoring_seconds > 0
    ratios = [layer.oq_ratio for layer in stats.layers]
    assert max(ratios) == 1.0 and min(ratios) < 1.0  # measured, per layer
    for layer in stats.layers:
        assert layer.n_o + layer.n_q + layer.n_s + layer.n_e == stats.n_tokens
        assert layer.n_q > 0 or layer.oq_ratio == 1.0  # rho < 1 buys 4-bit tokens
    last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    assert np.isfinite(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))).all()
    text = llm.detokenize(generated).decode(errors="replace")
    assert len(set(generated)) > 20 and "\ufffd" not in text


def decode_logits(llm: Llama, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """The logits after the prompt and after each token of the continuation, decoded one by one
    (float64 log-probabilities)."""
    llm.eval(prompt)
    rows = [llm.scores[llm.n_tokens - 1].astype(np.float64)]
    for tok in continuation:
        llm.eval([tok])
        rows.append(llm.scores[llm.n_tokens - 1].astype(np.float64))
    x = np.array(rows)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def mean_kld(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(ref || got) over rows of log-probabilities."""
    return float((np.exp(ref) * (ref - got)).sum(axis=1).mean())


@pytest.fixture(scope="module")
def full_decode(smollm2: Path, tokens: list[int]) -> tuple[list[int], np.ndarray, float]:
    """The f16 cache's greedy continuation of a 600-token prompt, its decode logits, and how far
    llama.cpp's flash attention is from them (KLD): the spread of llama.cpp's own paths."""
    kwargs = dict(n_ctx=2048, n_threads=2, verbose=False, seed=0, logits_all=True)
    full = Llama(smollm2, **kwargs)
    text = full(full.detokenize(tokens[:600]).decode(), max_tokens=64, temperature=0)
    continuation = full.tokenize(text["choices"][0]["text"].encode(), add_bos=False)
    ref = decode_logits(Llama(smollm2, **kwargs), tokens[:600], continuation)
    fa = decode_logits(Llama(smollm2, flash_attn=True, **kwargs), tokens[:600], continuation)
    return continuation, ref, mean_kld(ref, fa)


@pytest.mark.parametrize("policy", ["arkv", "h2o", "window", "quant"])
def test_budget_larger_than_the_text_is_the_full_cache(
        smollm2: Path, tokens: list[int], policy: str,
        full_decode: tuple[list[int], np.ndarray, float]) -> None:
    # Every row stays in f16 and nothing is tailored. Decoding reads them through the fused
    # kernel (f32 queries and probabilities), not llama.cpp's attention (f16 queries, and f16
    # probabilities or accumulators): the logits must be no further from the f16 cache's than
    # llama.cpp's flash attention is (KLD 0.0045 here; a missing key or head costs far more)
    continuation, ref, spread = full_decode
    ours = Llama(smollm2, kv_policy=policy, kv_budget=2048, kv_rotate=False, n_ctx=2048,
                 n_threads=2, verbose=False, seed=0, logits_all=True)
    got = decode_logits(ours, tokens[:600], continuation)
    stats = ours.kv_stats()
    assert stats.n_tailorings == 0
    assert all(layer.n_o == stats.n_tokens for layer in stats.layers)
    assert len(continuation) > 20 and 0 < spread < 0.05
    assert mean_kld(ref, got) <= 1.5 * spread
    assert (ref.argmax(axis=1) == got.argmax(axis=1)).mean() >= 0.95


@pytest.mark.parametrize("policy", ["h2o", "window", "quant"])
def test_baselines_stay_within_budget(smollm2: Path, tokens: list[int], policy: str) -> None:
    llm = Llama(smollm2, kv_policy=policy, kv_budget=256, n_threads=2, verbose=False)
    llm.eval(tokens[:1500])
    stats = llm.kv_stats()
    assert stats.bytes_used <= stats.bytes_budget and stats.n_tokens == 1500
    n_q = {layer.n_q for layer in stats.layers}
    assert n_q == {0} if policy != "quant" else min(n_q) > 300  # quant: 4 bits buy 3.5x


def test_chat_streaming_and_prefix_reuse_work(smollm2: Path) -> None:
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=256, n_threads=2, verbose=False)
    messages = [{"role": "user", "content": "Tell me about the three laws of motion. " * 50}]
    pieces = [c["choices"][0]["delta"].get("content", "")
              for c in llm.create_chat_completion(messages, max_tokens=24, stream=True)]
    first = "".join(pieces)
    assert first.strip() and llm.kv_stats().n_tailorings > 0
    # the same conversation again: the tailored prefix cannot be reused, it is read again
    again = llm.create_chat_completion(messages, max_tokens=24, temperature=0)
    assert again["choices"][0]["message"]["content"].strip()
    assert llm.kv_stats().bytes_used <= llm.kv_stats().bytes_budget


TINY = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=1024)


def test_positions_run_to_the_trained_limit_without_n_ctx() -> None:
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy="window", kv_budget=128,
                verbose=False)
    assert llm.n_ctx() == 1024
    llm.eval([t % 250 for t in range(1000)])  # far past the physical cache
    assert llm.kv_stats().n_tokens == 1000
    llm.eval([1] * 30)  # past the window: a context shift, not an error (test_endless.py)
    stats = llm.kv_stats()
    assert (stats.n_tokens, stats.n_shifts, llm.n_tokens) == (1030, 1, 1030 - (1024 - 4) // 2)


def test_n_ctx_is_the_window_asked_for() -> None:
    path = tiny_model_path("llama", **TINY)
    llm = Llama(path, kv_policy="arkv", kv_budget=128, n_ctx=256, verbose=False)
    assert llm.n_ctx() == 256
    llm.eval([t % 250 + 1 for t in range(256)])  # past the budget, up to the window
    llm.eval([1])  # past the window: one context shift
    assert (llm.kv_stats().n_shifts, llm.n_tokens) == (1, 257 - (256 - 4) // 2)
    llm.reset()
    # max_tokens=-1 runs to the window, not to the trained limit
    out = llm.create_completion([t % 250 + 1 for t in range(100)], max_tokens=-1,
                                temperature=0, logit_bias={llm.token_eos(): -1e9})
    assert out["usage"]["completion_tokens"] == 156
    # llama.cpp rounds n_ctx up to a multiple of 256: as with "full"
    assert Llama(path, kv_policy="window", kv_budget=128, n_ctx=300, verbose=False).n_ctx() \
        == Llama(path, n_ctx=300, verbose=False).n_ctx() == 512
    # n_ctx=0: the trained limit, and the budget's default with it (as llama_cpp's n_ctx=0)
    zero = Llama(path, kv_policy="window", n_ctx=0, verbose=False)
    assert zero.n_ctx() == 1024
    assert zero.kv_stats().bytes_budget == 1024 * arkv_local.models.f16_slot_bytes(path) * 2
    # no n_ctx: the budget stays 512 tokens, positions run to the trained limit
    default = Llama(path, kv_policy="window", verbose=False)
    assert default.n_ctx() == 1024
    assert default.kv_stats().bytes_budget == 512 * arkv_local.models.f16_slot_bytes(path) * 2


class NamesAGhostSlot(Policy):
    """A broken custom policy: its plan names an O slot that does not exist."""

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        return view.layers[layer].pos * 1.0

    def plan(self, view: KVView, budget: object, room: int, **kw: int) -> list[LayerPlan]:
        plans = super().plan(view, budget, room, **kw)  # type: ignore[arg-type]
        plans[0].o_src[0, 0] = 10**6
        return plans


def test_errors_are_named_before_anything_changes(smollm2: Path, tokens: list[int]) -> None:
    with pytest.raises(ValueError, match="unknown kv_policy 'lru'"):
        Llama(smollm2, kv_policy="lru")
    with pytest.raises(ValueError, match="unknown quant type 'q3_k'"):
        Llama(smollm2, kv_policy="arkv", kv_quant="q3_k")
    with pytest.raises(ValueError, match="arkv tau must be three positive numbers"):
        Llama(smollm2, kv_policy="arkv", arkv_tau=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match=r"budget of 40 tokens is below the window \(32\) \+ "
                                         r"sinks \(4\) \+ slack \(10\) = 46"):
        Llama(smollm2, kv_policy="arkv", kv_budget=40)
    with pytest.raises(ValueError, match="kv_budget needs a kv_policy other than 'full'"):
        Llama(smollm2, kv_budget=64)
    with pytest.raises(ValueError, match="not both"):
        Llama(smollm2, kv_policy="h2o", kv_budget=512, kv_budget_bytes=10**6)
    with pytest.raises(ValueError, match="serves one sequence"):
        Llama(smollm2, kv_policy="arkv", embedding=True, verbose=False)
    llm = Llama(smollm2, kv_policy=NamesAGhostSlot(slack=8), kv_budget=128, verbose=False)
    llm.eval(tokens[:100])
    before = llm.kv_stats()
    with pytest.raises(ValueError, match="plan refused: layer 0: head 0 names O slot 1000000"):
        llm.eval(tokens[100:140])
    assert llm.kv_stats() == before


def test_the_custom_policy_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location(
        "custom_policy", Path(__file__).parent.parent / "examples" / "custom_policy.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "custom_policy", example)  # @dataclass looks it up
    spec.loader.exec_module(example)
    path = tiny_model_path("llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    llm = Llama(path, kv_policy=example.Recency(o_share=0.25), kv_budget=200, verbose=False,
                kv_spill=None)  # evicted for good: a recall would rank by attention
    llm.eval([t % 250 for t in range(900)])
    stats = llm.kv_stats()
    assert stats.bytes_used <= stats.bytes_budget and stats.n_tailorings > 0
    for layer in stats.layers:
        assert layer.oq_ratio == 0.25 and layer.n_q > layer.n_o  # mostly 4-bit, as asked
    pos_o, pos_q, _ = llm._tailor.kv.positions()
    first = stats.layers[0]
    sinks = llm._tailor.policy.sinks  # the first tokens stay in f16 (4, the default)
    assert sinks == 4 and set(range(sinks)) <= set(pos_o[0][: first.n_o, 0].tolist())
    assert pos_q[0][: first.n_q].min() == sinks + first.n_e  # exactly the oldest were evicted


def test_one_llama_reads_two_long_prompts_as_a_fresh_one_would(
        smollm2: Path, tokens: list[int]) -> None:
    # a second document after the cache was tailored (no shared prefix, then after reset()):
    # it starts from the layout a fresh object has, so it answers exactly as a fresh object
    kwargs = dict(kv_policy="arkv", kv_budget=128, n_threads=2, verbose=False)
    llm = Llama(smollm2, **kwargs)
    first = llm.detokenize(tokens[:400]).decode()
    second = llm.detokenize(tokens[2000:2400]).decode()
    assert llm(first, max_tokens=4, temperature=0)["choices"][0]["text"]
    assert llm.kv_stats().n_tailorings > 0
    answers = [llm(second, max_tokens=12, temperature=0)["choices"][0]["text"]]
    llm.reset()
    answers.append(llm(second, max_tokens=12, temperature=0)["choices"][0]["text"])
    fresh = Llama(smollm2, **kwargs)
    expected = fresh(second, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert answers == [expected] * 2 and len(expected) > 10
    # the second document's statistics were measured, as on a fresh object
    assert [la.oq_ratio for la in llm.kv_stats().layers] == \
        [la.oq_ratio for la in fresh.kv_stats().layers]


class SeesStats(Policy):
    """Reads ARKV's prefill statistics (needs_stats) but no per-token scores; records them."""

    needs_stats = True

    def ratios(self, view: KVView) -> np.ndarray:
        SEEN_STATS.append(view.stats)
        return np.ones(len(view.layers))

    def scores(self, view: KVView, layer: int) -> np.ndarray:
        return view.layers[layer].pos * 1.0


SEEN_STATS: list[np.ndarray | None] = []


def test_a_policy_that_needs_only_statistics_sees_them_measured() -> None:
    # the memory observes queries when a policy reads statistics, even without scores
    SEEN_STATS.clear()
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy=SeesStats(), kv_budget=128,
                verbose=False)
    llm.eval([t % 250 + 1 for t in range(400)])  # past the window and the budget
    assert llm.kv_stats().n_tailorings > 0 and len(SEEN_STATS) > 0
    for stats in SEEN_STATS:
        assert stats is not None and stats.shape == (TINY["n_layer"], 3)
        assert np.isfinite(stats).all() and (stats > 0).all()


def last_logits(llm: Llama) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


@pytest.mark.parametrize("step", ["alloc", "compute"])
def test_a_failed_update_raises_and_the_cache_goes_on_right(
        step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan whose graph cannot be allocated leaves the cache as it was; one that fails while
    computing clears it, and the next eval reads the history again: either way, an error that
    names it, then the same logits as an object that never failed."""
    path = tiny_model_path("llama", **TINY)
    kwargs = dict(kv_policy="arkv", kv_budget=128, n_ctx=512, n_batch=32, verbose=False)
    toks = [t * 7 % 250 + 1 for t in range(300)]
    llm = Llama(path, **kwargs)
    llm.eval(toks[:200])
    monkeypatch.setenv("ARKV_DEBUG_FAIL_UPDATE", step)
    said = ("could not allocate the graph that applies the plan: the cache is unchanged"
            if step == "alloc" else "the graph that applies the plan failed: the cache was cleared")
    with pytest.raises(RuntimeError, match=said):
        llm.eval(toks[200:])
    monkeypatch.delenv("ARKV_DEBUG_FAIL_UPDATE")
    read = llm.n_tokens
    held = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0) + 1
    assert held == (read if step == "alloc" else 0) and 200 <= read < 300
    llm.eval(toks[read:])
    twin = Llama(path, **kwargs)
    if step == "alloc":  # the same reads, in the same chunks
        twin.eval(toks[:200])
        twin.eval(toks[200:])
    else:  # the history read again from the start, in one eval
        twin.eval(toks)
    np.testing.assert_array_equal(last_logits(llm), last_logits(twin))
    assert llm.kv_stats().n_tokens == 300


def test_the_compute_buffer_is_reserved_for_the_chunks_a_policy_reads(smollm2: Path) -> None:
    """llama.cpp reserves compute memory for n_ubatch (512) tokens, a row of logits each (96
    MiB for SmolLM2's vocabulary); a policy never decodes more than one chunk at a time."""
    from arkv_local import arkv_cpp

    def compute(**kwargs: object) -> tuple[int, int]:
        llm = Llama(smollm2, n_ctx=1024, verbose=False, **kwargs)  # type: ignore[arg-type]
        try:
            return llm.context_params.n_ubatch, arkv_cpp.llama_arkv_compute_bytes(llm.ctx)
        finally:
            llm.close()

    n_ubatch, stock = compute()
    chunk = arkv_local.policies.make_policy("arkv").read_chunk(256)  # type: ignore[union-attr]
    assert n_ubatch == 512 and chunk < 512
    n_ubatch, reserved = compute(kv_policy="arkv", kv_budget=256)
    assert n_ubatch == chunk and reserved < stock * (chunk + 16) / 512
    assert compute(kv_policy="arkv", kv_budget=256, n_ubatch=32)[0] == 32


def test_plans_that_reshape_the_pools_leave_no_compute_buffer_warning(
        smollm2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plan that quantizes rows reshapes the pools, and llama.cpp reserves its compute buffer
    again for the new worst case: that reserve is what it expects at close (it warned that the
    buffer "does not match expectation" when any chat closed after such a plan)."""
    from arkv_local import arkv_cpp

    llm = Llama(smollm2, kv_policy="arkv", kv_budget=256, n_ctx=1024, verbose=True)
    before = arkv_cpp.llama_arkv_compute_bytes(llm.ctx)
    llm.eval(llm.tokenize(("The quick brown fox jumps over the lazy dog. " * 30).encode()))
    assert llm.kv_stats().layers[0].n_q > 0
    assert arkv_cpp.llama_arkv_compute_bytes(llm.ctx) > before  # the reserve did grow
    capsys.readouterr()
    llm.close()
    assert "does not match expectation" not in capsys.readouterr().err
