"""Endless sequences: past the context window (n_ctx) in the same bounded memory, by context
shifts, checked against llama.cpp's own cache shifted the same way."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from arkv_local import Llama
from arkv_local.llama import _common_prefix, _without_oldest_turn
from arkv_local.tiny_models import tiny_model_path

TINY = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=1024)
N_CTX, SINKS = 256, 4
DISCARD = (N_CTX - SINKS) // 2  # what one shift takes out of a window of 256


def tokens(n: int, start: int = 0) -> list[int]:
    return [(t * 7 + 3) % 250 + 1 for t in range(start, start + n)]


def count_reads(llm: Llama) -> list[int]:
    """The lengths of the token lists llm.eval is given from now on (generate's reads too)."""
    read: list[int] = []
    eval_ = llm.eval

    def counted(toks: list[int]) -> None:
        read.append(len(toks))
        eval_(toks)

    llm.eval = counted  # type: ignore[method-assign]
    return read


def positions_held(llm: Llama) -> int:
    """The highest position in the memory, plus one."""
    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0) + 1


@pytest.mark.parametrize("policy", ["arkv", "window", "quant"])
def test_eval_goes_on_past_the_window_in_the_budget(policy: str) -> None:
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy=policy, kv_budget=128, n_ctx=N_CTX,
                n_batch=64, verbose=False)
    for i in range(0, 900, 150):
        llm.eval(tokens(150, i))
        stats = llm.kv_stats()
        assert stats.bytes_used <= stats.bytes_budget
        assert llm.n_tokens <= N_CTX and positions_held(llm) == llm.n_tokens
    stats = llm.kv_stats()
    assert stats.n_tokens == 900 == llm.n_tokens + DISCARD * stats.n_shifts
    assert stats.n_shifts == 6  # (900 - 256) / 126 rounded up, chunk by chunk
    # the window holds the first tokens, then the newest ones
    assert llm.input_ids[:SINKS].tolist() == tokens(SINKS)
    assert llm.input_ids[SINKS : llm.n_tokens].tolist() == tokens(llm.n_tokens - SINKS,
                                                                 900 - llm.n_tokens + SINKS)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_shift_is_llama_cpps_context_shift(arch: str) -> None:
    """With nothing evicted and no rotation, a policy shifted past the window gives the logits
    of llama.cpp's own f16 cache given the same seq_rm + seq_add."""
    path = str(tiny_model_path(arch, **TINY))
    common = dict(n_ctx=N_CTX, n_batch=64, logits_all=True, verbose=False, seed=0)
    ours = Llama(path, kv_policy="arkv", kv_budget=N_CTX, kv_rotate=False, **common)
    stock = llama_cpp.Llama(path, **common)
    first, then = tokens(250), tokens(20, 250)
    ours.eval(first)
    stock.eval(first)
    ours.eval(then)  # 270 positions: a shift first
    assert ours.kv_stats().n_shifts == 1 and ours.n_tokens == 250 - DISCARD + 20
    mem = llama_cpp.llama_get_memory(stock.ctx)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, SINKS, SINKS + DISCARD)
    llama_cpp.llama_memory_seq_add(mem, 0, SINKS + DISCARD, -1, -DISCARD)
    stock.input_ids[SINKS : 250 - DISCARD] = stock.input_ids[SINKS + DISCARD : 250].copy()
    stock.n_tokens = 250 - DISCARD
    stock.eval(then)
    n = ours.n_tokens
    assert ours.input_ids[:n].tolist() == stock.input_ids[:n].tolist()
    new = slice(n - 20, n)
    assert np.isfinite(ours.scores[new]).all()
    np.testing.assert_allclose(ours.scores[new], stock.scores[new], rtol=0, atol=2e-3)
    # and they differ from logits with the rows left unshifted (the check can fail)
    fresh = llama_cpp.Llama(path, **common)
    fresh.eval(first[:SINKS] + first[SINKS + DISCARD :] + then)
    assert np.abs(fresh.scores[new] - stock.scores[new]).max() > 10 * 2e-3


def test_generate_goes_on_past_the_window_with_one_sampler() -> None:
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy="arkv", kv_budget=128, n_ctx=N_CTX,
                verbose=False)
    made = []
    init = llm._init_sampler

    def counted(*args: object, **kwargs: object) -> object:
        made.append(1)
        return init(*args, **kwargs)

    llm._init_sampler = counted  # type: ignore[method-assign]
    out = list(islice(llm.generate(tokens(40), temp=0.0, repeat_penalty=1.1), 700))
    assert len(out) == 700 and len(made) == 1
    stats = llm.kv_stats()
    assert stats.n_shifts >= 3 and stats.bytes_used <= stats.bytes_budget
    # every token but the last was read; the window holds the newest of them
    assert stats.n_tokens == 40 + 699
    assert llm.input_ids[llm.n_tokens - 100 : llm.n_tokens].tolist() == out[-101:-1]


def test_completion_after_shifts_reads_only_the_new_tokens() -> None:
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy="arkv", kv_budget=128, n_ctx=N_CTX,
                verbose=False)
    read = count_reads(llm)
    seen = 0
    for turn in range(12):  # 12 x 60 tokens: past the window of 256 several times
        prompt = llm_history(llm) + tokens(10, 1000 + turn * 10)
        read.clear()
        out = llm.create_completion(prompt, max_tokens=50, temperature=0,
                                    logit_bias={llm.token_eos(): -1e9})
        # the prompt's new tokens and the answer's (its last token is sampled, not read)
        assert sum(read) == 10 + out["usage"]["completion_tokens"] - 1, (turn, read)
        seen += sum(read)
    assert llm.kv_stats().n_shifts >= 2
    assert llm.kv_stats().n_tokens == seen


def test_a_history_read_back_otherwise_is_cut_there(decoded: list[int]) -> None:
    """A prompt that leaves the history near its end (an answer tokenized otherwise when read
    back) after shifts and plans: the cache is cut there, its tailored rows kept, and keeps the
    history the shifts took out; nothing held is read again, this turn or the next."""
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy="arkv", kv_budget=128, n_ctx=N_CTX,
                verbose=False)
    read = count_reads(llm)
    options = dict(max_tokens=50, temperature=0, logit_bias={llm.token_eos(): -1e9})
    for turn in range(8):
        llm.create_completion(llm_history(llm) + tokens(10, 1000 + turn * 10), **options)
    assert llm.kv_stats().n_shifts >= 1
    history = llm_history(llm)
    held = llm.n_tokens
    decoded.clear()
    other = history[:-80] + [(history[-80] % 250) + 2] + tokens(10, 2000)  # in a tailored part
    out = llm.create_completion(other, **options)
    assert sum(decoded) == 11 + out["usage"]["completion_tokens"] - 1  # only the new tokens
    assert llm_history(llm)[: len(history) - 80] == history[:-80]
    assert llm.n_tokens == held - 80 + 11 + out["usage"]["completion_tokens"] - 1
    assert llm.kv_stats().bytes_used <= llm.kv_stats().bytes_budget
    for turn in range(3):
        read.clear()
        out = llm.create_completion(llm_history(llm) + tokens(10, 3000 + turn * 10), **options)
        assert sum(read) == 10 + out["usage"]["completion_tokens"] - 1


def test_an_answer_past_the_window_is_whole_when_the_history_reads_back_otherwise() -> None:
    """Before any shift, a prompt that leaves the cache's history near its end (an answer
    tokenized otherwise when read back) and whose answer would overrun the window: the window
    shifts first, as for a prompt that extends the history, and the answer gets its max_tokens
    (llama_cpp cut it at n_ctx: the soak's fourth turn, 42 of 128 tokens)."""
    llm = Llama(tiny_model_path("llama", **TINY), kv_policy="arkv", kv_budget=128, n_ctx=N_CTX,
                verbose=False)
    a = llm.tokenize(b"a", add_bos=False)[0]  # every answer token: 50 tokens are 50 "a"s
    options = dict(max_tokens=50, temperature=0, logit_bias={a: 1e9})
    llm.create_completion(tokens(150), **options)  # 199 positions held, no shift yet
    assert llm.kv_stats().n_shifts == 0 and llm.n_tokens == 150 + 50 - 1  # the last: sampled
    history = llm_history(llm)
    other = history[:-20] + [(history[-20] % 250) + 2] + tokens(30, 2000)  # 210 + 50 > 256
    llm.create_completion(other, **options)
    assert llm.kv_stats().n_shifts == 1
    history = llm_history(llm)  # the prompt, then the whole answer (as the first turn's)
    assert history[: len(other)] == other and len(history) == len(other) + 50 - 1


def llm_history(llm: Llama) -> list[int]:
    """What the sequence read: the window's first tokens, what shifts took out, the rest."""
    s = llm._tailor.session
    held = llm.input_ids[: llm.n_tokens].tolist()
    return held[:SINKS] + list(s.dropped) + held[SINKS:]


def test_state_saved_after_shifts_goes_on_the_same() -> None:
    path = tiny_model_path("llama", **TINY)
    kwargs = dict(kv_policy="arkv", kv_budget=128, n_ctx=N_CTX, verbose=False)
    llm = Llama(path, **kwargs)
    llm.eval(tokens(600))
    state, shifts = llm.save_state(), llm.kv_stats().n_shifts
    assert shifts >= 3
    after = list(islice(llm.generate(tokens(5, 600), temp=0.0, reset=False), 30))
    other = Llama(path, **kwargs)
    other.load_state(state)
    assert other.kv_stats().n_shifts == shifts
    assert list(islice(other.generate(tokens(5, 600), temp=0.0, reset=False), 30)) == after
    assert llm_history(other)[:600] == tokens(600)


def test_a_chat_longer_than_the_window_loses_its_oldest_turns(
        smollm2: Path, caplog: pytest.LogCaptureFixture) -> None:
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=128, n_ctx=256, verbose=False)
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        messages += [{"role": "user", "content": f"Fact {i}: the river number {i} is long. " * 2},
                     {"role": "assistant", "content": "Noted, that is a fact I keep."}]
    messages.append({"role": "user", "content": "Say hello."})
    with caplog.at_level(logging.WARNING, logger="arkv_local"):
        out = llm.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert out["choices"][0]["message"]["content"].strip()
    assert any("oldest messages were left out" in r.getMessage() for r in caplog.records)
    assert out["usage"]["prompt_tokens"] < 256


def test_helpers() -> None:
    assert _common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert _common_prefix([1, 2], [1, 2, 3]) == 2
    assert _common_prefix([], [1]) == 0
    s, u1, a1, u2 = ({"role": r, "content": r} for r in ("system", "user", "assistant", "user"))
    assert _without_oldest_turn([s, u1, a1, u2]) == [s, u2]
    assert _without_oldest_turn([u1, a1, u2]) == [u2]
    assert _without_oldest_turn([s, u2]) is None


def test_a_chat_three_windows_long_finds_a_key_given_after_the_last_shift(smollm2: Path) -> None:
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=128, n_ctx=512, seed=0, verbose=False)
    read = count_reads(llm)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]

    def turn(text: str, max_tokens: int = 48) -> str:
        messages.append({"role": "user", "content": text})
        read.clear()
        out = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)
        messages.append(out["choices"][0]["message"])
        # the new turn and the answer; of the history at most the last answer's tail, where
        # it reads back tokenized otherwise ('"bee' generated as '"', 'bee'): never all of it
        assert sum(read) <= len(llm.tokenize(text.encode())) + 24 + 2 * max_tokens, read
        return out["choices"][0]["message"]["content"]

    topics = ["rivers", "bread", "chess", "bees", "trains", "glass", "tea", "owls"]
    while llm.kv_stats().n_tokens < 3 * 512:
        turn(f"Tell me one thing about {topics[len(messages) % len(topics)]}.")
    shifts = llm.kv_stats().n_shifts
    assert shifts >= 2
    turn("Remember this: the pass key is 48213.", max_tokens=16)
    answer = turn("What is the pass key? Answer with the number only.", max_tokens=12)
    assert "48213" in answer
    stats = llm.kv_stats()
    assert stats.bytes_used <= stats.bytes_budget
