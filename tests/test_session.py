"""A sequence's Python side (statistics, ratios, the policy's memory, counters) travels with
save_state/load_state, pickle and copy, and the memory knobs have one set of defaults."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import pickle

import llama_cpp
import numpy as np
import pytest

from arkv_local import Llama, arkv_cpp, defaults
from arkv_local.memory import ATTN_PATHS, QUANT_TYPES, MemoryParams, TriStateKV
from arkv_local.models import f16_slot_bytes
from arkv_local.policies import ARKV, H2O, Policy, make_policy
from arkv_local.tailoring import Tailor
from arkv_local.tiny_models import tiny_model_path

SMALL = dict(kv_budget=160, n_threads=2, verbose=False)


def record_plans(monkeypatch: pytest.MonkeyPatch) -> dict[int, list]:
    """Every plan submitted, per context, as plain lists."""
    plans: dict[int, list] = {}
    original = TriStateKV.submit

    def submit(self: TriStateKV, plan: list) -> None:
        plans.setdefault(self.ctx, []).append(
            [(p.cap_o, p.o_src.tolist(), p.q_src.tolist(), p.q_from.tolist()) for p in plan])
        original(self, plan)

    monkeypatch.setattr(TriStateKV, "submit", submit)
    return plans


def ema_arkv() -> ARKV:
    return ARKV(window=16, slack=16, ema=0.5)  # remembers earlier tailorings' scores


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(tiny_model_path("llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512))


def text(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 250, n).tolist()


def test_load_state_restores_the_python_side(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plans = record_plans(monkeypatch)
    a = Llama(tiny, kv_policy=ema_arkv(), **SMALL)
    b = Llama(tiny, kv_policy=ema_arkv(), **SMALL)
    first, other, more = text(1, 600), text(2, 600), text(3, 40)
    for llm in (a, b):
        llm.eval(first)
    saved = a.save_state()
    ratios = [layer.oq_ratio for layer in a.kv_stats().layers]
    stats = a._tailor.session.stats.copy()
    assert min(ratios) < 1.0  # measured: the test needs numbers another text changes

    a.reset()
    a.eval(other)  # another conversation: its own statistics, ratios and EMA
    assert [layer.oq_ratio for layer in a.kv_stats().layers] != ratios
    a.load_state(saved)
    assert [layer.oq_ratio for layer in a.kv_stats().layers] == ratios
    np.testing.assert_array_equal(a._tailor.session.stats, stats)

    n_before = {ctx: len(p) for ctx, p in plans.items()}
    for llm in (a, b):
        llm.eval(more)
    new_a = plans[a.ctx][n_before[a.ctx]:]
    new_b = plans[b.ctx][n_before[b.ctx]:]
    assert new_a and new_a == new_b  # the next plan is the one the saved conversation makes
    sa, sb = a.kv_stats(), b.kv_stats()
    assert (sa.layers, sa.bytes_used, sa.n_tailorings) == (sb.layers, sb.bytes_used,
                                                           sb.n_tailorings)


def test_load_state_refuses_another_policys_state(tiny: str) -> None:
    a = Llama(tiny, kv_policy="arkv", **SMALL)
    a.eval(text(1, 300))
    state = a.save_state()
    h = Llama(tiny, kv_policy="h2o", **SMALL)
    h.eval(text(1, 50))
    before = h.kv_stats()
    with pytest.raises(ValueError, match="saved under kv_policy 'arkv'.*'h2o'"):
        h.load_state(state)
    assert h.kv_stats() == before and h.n_tokens == 50
    full = Llama(tiny, **{k: v for k, v in SMALL.items() if not k.startswith("kv_")})
    full.eval(text(1, 50))
    with pytest.raises(ValueError, match="saved under kv_policy 'arkv'.*not kv_policy 'full'"):
        full.load_state(state)  # llama.cpp's cache cannot read it (llama_cpp: "Failed to set")
    assert full.n_tokens == 50


@pytest.mark.parametrize("knob, mine, theirs", [
    ("kv_rotate", False, True), ("kv_quant", "q4_0", "q8_0"), ("kv_budget", 160, 192)])
def test_load_state_refuses_a_cache_made_otherwise_before_anything_changes(
        tiny: str, knob: str, mine: object, theirs: object) -> None:
    # rows rotated or not, of another type, in arenas of another size: read as this cache's they
    # are garbage (a rotated state loaded silently into kv_rotate=False gave logits off by 22)
    saved_by = Llama(tiny, kv_policy="arkv", **{**SMALL, knob: theirs})
    saved_by.eval(text(1, 300))
    state = saved_by.save_state()
    llm = Llama(tiny, kv_policy="arkv", logits_all=True, **{**SMALL, knob: mine})
    llm.eval(text(2, 250))
    before, logits = llm.kv_stats(), llm.scores[249].copy()
    name = "kv_budget_bytes" if knob == "kv_budget" else knob
    with pytest.raises(ValueError, match=f"saved with {name}=.*this Llama has {name}="):
        llm.load_state(state)
    assert llm.kv_stats() == before and llm.n_tokens == 250
    np.testing.assert_array_equal(llm.scores[249], logits)
    # a state without the Python side's record of them (the C API's, or an older save): the
    # memory refuses it and says why; the object starts over empty, not half the saved state's
    del state.session["memory"]
    with pytest.raises(RuntimeError, match=f"not loaded: the saved ARKV state.*\\({knob}\\)"
                                           ".*cache was cleared"):
        llm.load_state(state)
    assert llm.n_tokens == 0 and llm.kv_stats().n_tokens == 0
    fresh = Llama(tiny, kv_policy="arkv", logits_all=True, **{**SMALL, knob: mine})
    for x in (llm, fresh):
        x.eval(text(2, 250))
    np.testing.assert_array_equal(llm.scores[249], fresh.scores[249])


@pytest.mark.parametrize("policy", ["arkv", "full"])
def test_a_state_loads_into_a_larger_window_and_goes_on_past_the_saved_one(
        tiny: str, policy: str) -> None:
    # llama_cpp kept the saved input_ids (512 long): an eval past 512 tokens then raised
    kw = {"kv_budget": 160} if policy != "full" else {}
    made = dict(kv_policy=policy, n_threads=2, verbose=False, logits_all=True, **kw)
    a = Llama(tiny, n_ctx=512, **made)
    a.eval(text(1, 300))
    state = a.save_state()
    b, ref = Llama(tiny, n_ctx=1024, **made), Llama(tiny, n_ctx=1024, **made)
    b.load_state(state)
    ref.eval(text(1, 300))
    for x in (b, ref):
        x.eval(text(2, 400))
    assert b.n_tokens == 700 and b.input_ids[:700].tolist() == ref.input_ids[:700].tolist()
    np.testing.assert_allclose(b.scores[699], ref.scores[699], atol=1e-4)
    small = Llama(tiny, n_ctx=256, **made)
    with pytest.raises(ValueError, match="holds 300 tokens, more than this Llama's window of 256"):
        small.load_state(state)
    assert small.n_tokens == 0


def test_a_state_of_the_previous_format_still_loads(tiny: str) -> None:
    # version 3 (before the rotation word): /save files of earlier versions load as they are
    llm = Llama(tiny, kv_policy="arkv", logits_all=True, **SMALL)
    llm.eval(text(1, 400))
    state = llm.save_state()
    raw = bytes(state.llama_state)
    at = raw.index(b"ARKV")
    assert raw[at + 4:at + 8] == (4).to_bytes(4, "little")
    old = raw[:at + 4] + (3).to_bytes(4, "little") + raw[at + 8:at + 24] + raw[at + 28:]
    state.llama_state, state.llama_state_size = old, len(old)
    fresh = Llama(tiny, kv_policy="arkv", logits_all=True, **SMALL)
    fresh.load_state(state)
    for x in (llm, fresh):
        x.eval(text(3, 20))
    np.testing.assert_array_equal(llm.scores[419], fresh.scores[419])


def test_load_state_refused_for_its_spilled_rows_leaves_a_usable_object(tiny: str) -> None:
    # the spill's size is not part of what a state must match, only whether its rows fit
    big = Llama(tiny, kv_policy="arkv", **SMALL)
    big.eval(text(1, 900))
    state = big.save_state()
    assert sum(layer.n_s for layer in big.kv_stats().layers) > 0
    small = Llama(tiny, kv_policy="arkv", kv_spill_bytes=4096, **SMALL)
    small.eval(text(2, 100))
    with pytest.raises(RuntimeError, match="spilled rows per layer.*kv_spill.*cache was cleared"):
        small.load_state(state)
    assert small.n_tokens == 0
    assert small("x", max_tokens=2, temperature=0)["choices"]  # usable, from an empty cache


def test_states_pickle_as_data_for_the_disk_cache(tiny: str) -> None:
    llm = Llama(tiny, kv_policy=ema_arkv(), **SMALL)
    llm.eval(text(1, 400))
    state = llm.save_state()
    json.dumps(state.session)  # plain data
    again = pickle.loads(pickle.dumps(state))
    assert again.session == state.session
    llm.reset()
    llm.eval(text(2, 200))
    llm.load_state(again)
    assert llm._tailor.session.snapshot() == state.session


def test_ram_cache_keeps_the_policys_side_with_the_cache(tiny: str) -> None:
    llm = Llama(tiny, kv_policy="arkv", **SMALL)
    llm.set_cache(llama_cpp.LlamaRAMCache())
    prompt = llm.detokenize(text(1, 400)).decode(errors="ignore")
    llm(prompt, max_tokens=4, temperature=0)
    (state,) = llm.cache.cache_state.values()
    assert state.session["n_tailorings"] > 0


def knobs(llm: Llama) -> tuple:
    policy = llm._tailor.policy
    fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init}
    return type(policy), fields, llm._tailor.params, llm.kv_stats().bytes_budget


def test_pickle_and_copy_keep_the_policy_and_its_knobs(tiny: str) -> None:
    llm = Llama(tiny, kv_policy="arkv", kv_budget=300, kv_window=16, kv_sinks=2,
                kv_slack=32, kv_quant="q8_0", kv_rotate=False, kv_observe=8, arkv_gamma=2.0,
                n_ctx=1024, verbose=False)
    assert llm._tailor.params.quant == "q8_0" and llm._tailor.params.n_score_queries == 8
    for clone in (pickle.loads(pickle.dumps(llm)), copy.copy(llm)):
        assert clone.kv_policy == "arkv"
        assert knobs(clone) == knobs(llm) and clone.n_ctx() == llm.n_ctx()
        assert clone.kv_stats().bytes_budget == 300 * 4 * f16_slot_bytes(tiny)

    mine = Llama(tiny, kv_policy=H2O(window=8, slack=8, ema=0.5), kv_budget=200,
                 verbose=False)
    clone = copy.copy(mine)
    assert knobs(clone) == knobs(mine) and clone.n_ctx() == mine.n_ctx()  # no n_ctx given
    assert clone._tailor.policy is not mine._tailor.policy  # its memory is its own


def test_kv_observe_is_its_own_knob(tiny: str) -> None:
    llm = Llama(tiny, kv_policy="h2o", kv_budget=200, kv_window=8, verbose=False)
    assert llm._tailor.params.n_score_queries == defaults.OBSERVE == 32  # not the window
    llm = Llama(tiny, kv_policy="h2o", kv_budget=200, kv_observe=4, verbose=False)
    assert llm._tailor.params.n_score_queries == 4
    llm = Llama(tiny, kv_policy="window", kv_budget=200, verbose=False)
    assert llm._tailor.params.n_score_queries == 0  # nothing reads scores: none computed
    with pytest.raises(ValueError, match="kv_observe must be >= 1 .*'arkv'.*got 0"):
        Llama(tiny, kv_policy="arkv", kv_budget=200, kv_observe=0)


class StatsOnly(Policy):
    """Reads the prefill statistics, not the per-token scores."""

    needs_stats = True

    def scores(self, view: object, layer: int) -> np.ndarray:
        return view.layers[layer].pos * 1.0  # type: ignore[attr-defined]


def test_a_policy_reading_statistics_gets_them(tiny: str) -> None:
    llm = Llama(tiny, kv_policy=StatsOnly(), kv_budget=200, verbose=False)
    assert llm._tailor.params.n_score_queries == defaults.OBSERVE
    llm.eval(text(1, 600))
    assert llm._tailor.session.stats is not None and llm._tailor.session.stats.any()


@pytest.mark.parametrize(("budget", "n_prompt", "n_every"), [(200, 2000, 2), (2500, 1100, 3)])
def test_statistics_are_measured_only_on_the_chunk_that_keeps_them(
        tiny: str, monkeypatch: pytest.MonkeyPatch, budget: int, n_prompt: int,
        n_every: int) -> None:
    # The first plan (budget 200: the third chunk of 82) or the prompt's end (2500: nothing is
    # evicted, chunks of 512) keeps the statistics of the chunk before it. Measuring only that
    # chunk gives the statistics and plans of measuring every chunk, in one request, not n_every
    requests: list[int] = []
    original_request = TriStateKV.request_stats

    def count(self: TriStateKV) -> None:
        requests.append(self.ctx)
        original_request(self)

    monkeypatch.setattr(TriStateKV, "request_stats", count)
    plans = record_plans(monkeypatch)
    runs, original = [], Tailor.before_decode
    for every_chunk in (False, True):
        if every_chunk:  # n_next 0: as if each chunk could end the read
            monkeypatch.setattr(Tailor, "before_decode",
                                lambda self, n, pos, n_next=0: original(self, n, pos, 0))
        llm = Llama(tiny, kv_policy="arkv", kv_budget=budget, n_ctx=4096, n_threads=2,
                    verbose=False)
        llm.eval(text(5, n_prompt))
        stats = llm._tailor.session.stats
        assert stats is not None and stats.any()
        runs.append((stats, plans.get(llm.ctx, []), requests.count(llm.ctx)))
    (stats_a, plans_a, n_a), (stats_b, plans_b, n_b) = runs
    assert (n_a, n_b) == (1, n_every)
    np.testing.assert_array_equal(stats_a, stats_b)
    assert plans_a == plans_b and (len(plans_a) > 5) == (budget < n_prompt)


def test_slack_follows_the_budget_unless_given() -> None:
    # a plan's cost grows with the rows it ranks: past 64 x 64 tokens of budget the default
    # slack is 1/64 of it, so that decoding plans as often per cost; below 4 x 64 it is 1/4 of
    # it, so that the room a plan frees leaves budget for past tokens; a knob or a policy object
    # given keeps its own
    path = tiny_model_path("llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
    kw = dict(kv_policy="arkv", n_ctx=20480, verbose=False)  # a window that holds each budget
    assert defaults.slack_for(4096) == 64 and defaults.slack_for(8192) == 128
    assert [defaults.slack_for(b) for b in (256, 255, 128, 48, 3)] == [64, 63, 32, 12, 1]
    for budget, slack, want in ((1024, None, 64), (4096, None, 64), (20000, None, 312),
                                (20000, 32, 32), (128, None, 32), (128, 64, 64)):
        llm = Llama(str(path), kv_budget=budget, kv_slack=slack, **kw)
        assert llm._tailor.policy.slack == want
        llm.close()
    llm = Llama(str(path), kv_budget=20000, **dict(kw, kv_policy=ARKV(slack=16)))
    assert llm._tailor.policy.slack == 16
    llm.close()


def test_defaults_have_one_source() -> None:
    assert Policy().window == defaults.WINDOW and Policy().sinks == defaults.SINKS
    assert Policy().slack == defaults.SLACK
    assert make_policy("h2o").window == defaults.WINDOW
    p = MemoryParams(budget_bytes=1)
    assert (p.quant, p.rotate, p.n_score_queries, p.attn, p.n_o_init) == (
        defaults.QUANT, defaults.ROTATE, defaults.OBSERVE, defaults.ATTN, defaults.N_O_INIT)
    sig = inspect.signature(Llama.__init__).parameters
    assert sig["kv_quant"].default == defaults.QUANT
    assert sig["kv_rotate"].default == defaults.ROTATE
    assert sig["kv_observe"].default == defaults.OBSERVE
    c = arkv_cpp.llama_arkv_default_params()  # the C API's, for C callers
    assert (c.n_o_init, c.type_q, c.rotate, c.n_score_queries, c.attn) == (
        defaults.N_O_INIT, QUANT_TYPES[defaults.QUANT], defaults.ROTATE, defaults.OBSERVE,
        ATTN_PATHS[defaults.ATTN])


def test_tailor_owns_one_session(tiny: str) -> None:
    llm = Llama(tiny, kv_policy="arkv", kv_budget=200, verbose=False)
    assert isinstance(llm._tailor, Tailor) and llm._tailor.policy is llm._tailor.session.policy
