"""Spill and recall: rows a plan removes from the budget's pools go, as 4-bit rows, to a host
store (S); a recall pass attends over them, and a plan brings them back. Checked against the
same cache that never spilled (bytes and logits), and as a user sees it (pass keys)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_reference import (
    ATTN,
    N_NEXT,
    N_PAST,
    QUANT_CAP_O,
    SEED,
    TOL_QUANT,
    TOL_SCORES,
    cache_rows,
    open_memory,
    q4_0_blocks,
    random_tokens,
    tiny_llama,  # noqa: F401  (fixture)
)

from arkv_local import Llama
from arkv_local.bench.speed import bench_text_tokens
from arkv_local.policies import Budget, KVView, LayerView
from arkv_local.policies.planner import plan_layer
from arkv_local.policies.types import POOL_O, POOL_Q, POOL_S, LayerPlan

N_O, N_Q, N_S = 60, 50, 60  # per head of N_PAST: kept in O, quantized, spilled (30 evicted)


def split_plan(mem, rng: np.random.Generator, spill: bool) -> tuple[list[LayerPlan], list]:
    """Per layer and head, random O slots: N_O stay, N_Q go to Q and N_S to S (spill) or to
    Q after the others (not spill). Returns the plan and the rows (layer, pool, head slots)."""
    plan, rows = [], []
    for info in mem.layers():
        perm = np.stack([rng.permutation(info.n_o) for _ in range(mem.n_head_kv)], 1)
        o, q, s = perm[:N_O], perm[N_O:N_O + N_Q], perm[N_O + N_Q:N_O + N_Q + N_S]
        o, q, s = (np.ascontiguousarray(x, np.int32) for x in (o, q, s))
        frm = np.full_like
        if spill:
            plan.append(LayerPlan(QUANT_CAP_O, o, q, frm(q, POOL_O), s, frm(s, POOL_O)))
        else:
            qs = np.concatenate([q, s])
            plan.append(LayerPlan(QUANT_CAP_O, o, qs, frm(qs, POOL_O)))
        rows.append((o, q, s))
    return plan, rows


def identity_plan(mem, recall: bool) -> list[LayerPlan]:
    """Everything stays; with `recall`, the spilled rows come back into Q after the Q rows."""
    plan = []
    for info in mem.layers():
        heads = mem.n_head_kv
        o = np.repeat(np.arange(info.n_o, dtype=np.int32)[:, None], heads, 1)
        q = np.repeat(np.arange(info.n_q, dtype=np.int32)[:, None], heads, 1)
        frm = np.full(q.shape, POOL_Q, np.uint8)
        if recall:
            s = np.repeat(np.arange(info.n_s, dtype=np.int32)[:, None], heads, 1)
            s_frm = np.full_like(s, POOL_S, np.uint8)
            q, frm = np.concatenate([q, s]), np.concatenate([frm, s_frm])
        plan.append(LayerPlan(info.cap_o, o, q, frm))
    return plan


def run(path: Path, attn: str, spill: bool, n_recall: int = 1):
    """Prefill, a plan that spills (or quantizes) N_S rows per head, n_recall tokens read in a
    recall pass, a plan that recalls them (or keeps all), N_NEXT - 1 tokens decoded."""
    rng = np.random.default_rng(SEED)
    tokens = random_tokens(path, N_PAST + n_recall + N_NEXT - 1, rng)
    llm, mem = open_memory(path, *ATTN[attn], cap_s=128 if spill else 0)
    llm.eval(tokens[:N_PAST])
    before = cache_rows(llm, mem)
    plan, rows = split_plan(mem, rng, spill)
    mem.submit(plan)
    mem.set_recall(True)  # no spilled row on the `not spill` side: the same as off
    llm.eval(tokens[N_PAST:N_PAST + n_recall])
    mem.set_recall(False)
    spilled = cache_rows(llm, mem)
    scores = mem.scores()
    mem.submit(identity_plan(mem, recall=spill))
    for t in range(N_PAST + n_recall, len(tokens)):
        llm.eval(tokens[t:t + 1])
    logits = llm.scores[N_PAST:len(tokens)].astype(np.float64)
    return llm, mem, logits, before, rows, spilled, scores, cache_rows(llm, mem)


# a recall pass of one token (decoded: the fused kernel over S rows, as over Q rows on the other
# side) and of 12, a question (the fused kernel reads S where it lies, the other side dequantizes Q)
@pytest.mark.parametrize("n_recall", [1, 12])
@pytest.mark.parametrize("attn", ["mul_mat", "flash", "fused"])
def test_spill_then_recall_is_a_plan_that_never_spilled(tiny_llama: Path, attn: str,  # noqa: F811
                                                        n_recall: int) -> None:
    a = run(tiny_llama, attn, spill=True, n_recall=n_recall)
    b = run(tiny_llama, attn, spill=False, n_recall=n_recall)
    llm_a, mem_a, logits_a, before, rows, spilled, scores_a, after_a = a
    _, _, logits_b, _, _, spilled_b, scores_b, after_b = b
    for layer, (_, _, s) in enumerate(rows):
        # spilled rows are the q4_0 blocks of their O rows, with their positions
        for h in range(mem_a.n_head_kv):
            for kv in "kv":
                want = q4_0_blocks(before[layer][kv + "_o"][s[:, h], h].astype(np.float32))
                np.testing.assert_array_equal(spilled[layer][kv + "_s"][:, h], want)
            want_pos = before[layer]["pos_o"][s[:, h], h]
            assert spilled[layer]["pos_s"][:, h].tolist() == want_pos.tolist()
        # recalled rows hold the bytes they were spilled with, where the other cache quantized them
        # (the new tokens' own rows in layers past the first carry the attention's rounding)
        for key in ("pos_q", "k_q", "v_q", "pos_o", "k_o", "v_o"):
            n = N_O if key in ("k_o", "v_o") else None
            np.testing.assert_array_equal(after_a[layer][key][:n], after_b[layer][key][:n],
                                          err_msg=key)
        assert after_a[layer]["pos_s"].size == 0
        # the recall pass scored the spilled rows as the other cache scored them in Q
        # (the fused kernel reads Q rows with a q8_0 query: TOL_SCORES, as test_reference)
        for got, want in ((scores_a.sum_s[layer][:N_S], scores_b.sum_q[layer][N_Q:N_Q + N_S]),
                          (scores_a.sum_q[layer][:N_Q], scores_b.sum_q[layer][:N_Q])):
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL_SCORES * want.max())
    # the same logits: the first token read the spilled rows in its recall pass, the others Q
    # (the fused kernel's q8_0 query on the other side: test_reference's quantization bounds)
    tol = TOL_QUANT[ATTN[attn][0]] / (1 if attn == "fused" else 10)
    np.testing.assert_allclose(logits_a, logits_b, rtol=0, atol=tol)
    del llm_a


def test_a_pass_without_recall_does_not_read_the_spill(tiny_llama: Path) -> None:  # noqa: F811
    # the check above can fail: the same first token read without recall differs by far more
    rng = np.random.default_rng(SEED)
    tokens = random_tokens(tiny_llama, N_PAST + 1, rng)
    out = []
    for recall in (True, False):
        llm, mem = open_memory(tiny_llama, cap_s=128)
        llm.eval(tokens[:N_PAST])
        mem.submit(split_plan(mem, np.random.default_rng(SEED + 1), spill=True)[0])
        mem.set_recall(recall)
        llm.eval(tokens[N_PAST:])
        out.append(llm.scores[N_PAST].astype(np.float64))
        assert mem.scores().sum_s[0][:N_S].any() == recall  # only a recall pass scores S
    assert np.abs(out[0] - out[1]).max() > 10 * TOL_QUANT[False]


def test_spill_is_bounded_and_refused_beyond_its_slots(tiny_llama: Path) -> None:  # noqa: F811
    llm, mem = open_memory(tiny_llama, cap_s=16)
    llm.eval(random_tokens(tiny_llama, N_PAST, np.random.default_rng(SEED)))
    assert [(i.cap_s, i.n_s, i.bytes_spill) for i in mem.layers()] == [(16, 0, 0)] * mem.n_layer
    with pytest.raises(ValueError, match="n_s = 60 exceeds the 16 spill slots"):
        mem.submit(split_plan(mem, np.random.default_rng(SEED), spill=True)[0])
    del llm


# -- the planner ---------------------------------------------------------------------------


def test_planner_spills_keeps_spilled_rows_in_place_and_recalls_by_score() -> None:
    # one head; O holds positions 10..19 (window 2: 18, 19), S holds 0, 1, 2 (spilled before);
    # the scores rank S position 1 above every O row
    pos_o, pos_s = np.arange(10, 20)[:, None], np.array([[0], [1], [2]])
    lv = LayerView(pos_o, np.zeros((0, 1), int), np.zeros((10, 1)), np.zeros((10, 1)),
                   np.zeros((0, 1)), np.zeros((0, 1)), pos_s, np.zeros((3, 1)), np.zeros((3, 1)))
    score = np.array([[.5], [.1], [.2], [.3], [.4], [.6], [.7], [.05], [0], [0],  # O
                      [0], [.9], [.01]])                                                # S

    def plan(layer_bytes: int, cap_s: int) -> LayerPlan:
        budget = Budget(layer_bytes, slot_o=10, slot_q=3, align=1, cap_s=cap_s)
        return plan_layer(lv, score, 0.5, budget, 1, 19, window=2, sinks=0, quantize=True,
                          cap_s=cap_s)

    def rows(src: np.ndarray, frm: np.ndarray) -> list[tuple[int, int]]:
        return list(zip(frm[:, 0].tolist(), src[:, 0].tolist(), strict=True))

    # 100 bytes: window 2 + room 1 = 30, 70 left, half of it buys 3 O slots (0, 5, 6); the
    # 13 Q slots left by 6 O slots take all the others (in position order), S rows too: nothing
    # spilled
    p = plan(100, 4)
    assert p.o_src[:, 0].tolist() == [0, 5, 6, 8, 9]
    assert rows(p.q_src, p.q_from) == [(POOL_S, 0), (POOL_S, 1), (POOL_S, 2)] + [
        (POOL_O, s) for s in (1, 2, 3, 4, 7)]
    assert len(p.s_src) == 0
    # 66 bytes: 1 O slot (6), 8 Q slots: position 1 (S slot 1) comes back, the two lowest
    # stay spilled: position 0 in its slot 0, position 2 from slot 2 into the freed slot 1
    p = plan(66, 4)
    assert p.o_src[:, 0].tolist() == [6, 8, 9]
    assert rows(p.q_src, p.q_from) == [(POOL_S, 1)] + [(POOL_O, s) for s in (0, 1, 2, 3, 4, 5, 7)]
    assert rows(p.s_src, p.s_from) == [(POOL_S, 0), (POOL_S, 2)]
    # a spill of one slot keeps the higher-scored of the two (2); 0 is evicted
    p = plan(66, 1)
    assert rows(p.s_src, p.s_from) == [(POOL_S, 2)]
    # evicting instead (no spill): the same device layout, nothing spilled
    p = plan(66, 0)
    assert len(p.s_src) == 0 and p.o_src[:, 0].tolist() == [6, 8, 9]


def test_recall_scores_rank_spilled_rows_for_every_policy() -> None:
    # after a recall pass, even a policy ranking by recency brings back what the tail attended
    from arkv_local.policies import Quant

    pos_o = np.arange(40, 50)[:, None]
    pos_s = np.arange(0, 40)[:, None]
    mass_s = np.zeros((40, 1))
    mass_s[7] = 3.0  # the question attends to position 7
    lv = LayerView(pos_o, np.zeros((0, 1), int), np.zeros((10, 1)), np.zeros((10, 1)),
                   np.zeros((0, 1)), np.zeros((0, 1)), pos_s, mass_s, mass_s**2)
    # 80 bytes: window 4 + room 1 in O, 10 Q slots for 46 candidates (6 in O, 40 spilled)
    budget = Budget(layer_bytes=80, slot_o=10, slot_q=3, align=1, cap_s=64)
    for recall in (False, True):
        view = KVView([lv], n_queries=4, group=1, stats=None, pos_max=49, recall=recall)
        (plan,) = Quant(window=4, sinks=0, slack=1).plan(view, budget, room=1)
        back = {int(pos_s[s, 0]) for s, f in zip(plan.q_src[:, 0], plan.q_from[:, 0],
                                                 strict=True) if f == POOL_S}
        if recall:  # position 7 with the span around it (ties to the newer tokens)
            assert back == set(range(5, 15))
        else:  # the newest
            assert back == set(range(36, 40))


def test_a_token_one_head_picks_out_comes_back_in_every_head() -> None:
    # head 0 looks sharply at position 7 and faintly at 45, head 1 at 30: each head brings back
    # its own span first, then the other head's sharp one (as sharp as at least RECALL_PEAK of
    # the sharpest), not the faint one; when each head ranked alone it took the newest rows
    from arkv_local.policies import Quant

    pos_o = np.repeat(np.arange(60, 64)[:, None], 2, axis=1)
    pos_s = np.repeat(np.arange(0, 60)[:, None], 2, axis=1)
    mass_s = np.zeros((60, 2))
    mass_s[7, 0], mass_s[45, 0], mass_s[30, 1] = 3.0, 0.9, 2.0  # sum(p^2)/sum(p): 3, 0.9, 2
    zero_o, none = np.zeros((4, 2)), np.zeros((0, 2))
    lv = LayerView(pos_o, none.astype(int), zero_o, zero_o, none, none, pos_s, mass_s, mass_s**2)
    # 152 bytes: window 4 + room 1 in O (50), 34 Q slots (102) for 60 spilled rows
    budget = Budget(layer_bytes=152, slot_o=10, slot_q=3, align=1, cap_s=64)
    view = KVView([lv], n_queries=4, group=1, stats=None, pos_max=63, recall=True)
    (plan,) = Quant(window=4, sinks=0, slack=1).plan(view, budget, room=1)
    back = [{int(pos_s[s, h]) for s, f in zip(plan.q_src[:, h], plan.q_from[:, h], strict=True)
             if f == POOL_S} for h in (0, 1)]
    span = {p: set(range(p - 7, p + 8)) for p in (7, 30, 45)}
    assert back[0] == span[7] | span[30] | {52, 51, 50, 49}  # then its own faint one, newest first
    assert back[1] == span[30] | span[7] | {59, 58, 57, 56}  # then the newest: 45 is not shared


# -- as a user sees it -----------------------------------------------------------------------


def test_spill_errors_name_the_value(tmp_path: Path, smollm2: Path) -> None:
    with pytest.raises(ValueError, match="unknown kv_spill 'ram'"):
        Llama(smollm2, kv_policy="arkv", kv_budget=256, kv_spill="ram")
    with pytest.raises(ValueError, match="kv_spill_bytes=-5"):
        Llama(smollm2, kv_policy="arkv", kv_budget=256, kv_spill_bytes=-5)
    with pytest.raises(ValueError, match="kv_spill_bytes=100 holds no token"):
        Llama(smollm2, kv_policy="arkv", kv_budget=256, kv_spill_bytes=100)
    with pytest.raises(ValueError, match="not a writable directory"):
        Llama(smollm2, kv_policy="arkv", kv_budget=256, kv_spill="disk",
              kv_spill_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="kv_spill_dir is for kv_spill='disk'"):
        Llama(smollm2, kv_policy="arkv", kv_budget=256, kv_spill_dir=tmp_path)


PASSKEY = "The pass key is {k}. Remember it. {k} is the pass key. "
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def ask(llm: Llama, key: int, depth: float, n_filler: int = 46) -> str:
    cut = int(n_filler * depth)
    prompt = ("There is a pass key hidden in the following text. Find it and remember it. "
              + FILLER * cut + PASSKEY.format(k=key) + FILLER * (n_filler - cut)
              + "\nWhat is the pass key? Answer with the number only.")
    r = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0,
                                   max_tokens=12)
    return r["choices"][0]["message"]["content"] or ""


@pytest.mark.parametrize("spill", [None, "host", "disk"])
def test_pass_keys_at_a_quarter_of_the_bytes(smollm2: Path, spill: str | None,
                                             tmp_path: Path) -> None:
    # about 1,000 tokens in 256 f16 tokens' bytes: evicting loses the early keys, a spill
    # recalls them when the question is read; a spill to disk leaves no file behind
    kw = dict(kv_spill_dir=tmp_path) if spill == "disk" else {}
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=256, n_ctx=1536, kv_spill=spill,
                n_threads=2, verbose=False, **kw)
    found = [str(key) in ask(llm, key, depth) for key, depth in ((86556, 0.1), (67326, 0.3))]
    stats = llm.kv_stats()
    assert stats.bytes_used <= stats.bytes_budget
    if spill is None:
        assert not all(found) and stats.bytes_spill == 0 and stats.n_recalls == 0
    else:
        assert all(found) and stats.bytes_spill > 0 and stats.n_recalls == 2
        assert sum(s.n_s for s in stats.layers) > 0
    assert list(tmp_path.iterdir()) == []
    llm.close()


@pytest.mark.parametrize("policy", ["window", "arkv"])
def test_a_prompt_that_first_spills_in_its_last_chunk_is_recalled(smollm2: Path,
                                                                  policy: str) -> None:
    # about 1,000 tokens in 900 f16 tokens' bytes: only the chunk that holds the question
    # makes room, and the rows it spills (the key's, for the window) come back by its recall
    llm = Llama(smollm2, kv_policy=policy, kv_budget=900, n_ctx=1536, n_threads=2,
                verbose=False)
    answer = ask(llm, 86556, 0.1)
    stats = llm.kv_stats()
    assert stats.n_tailorings >= 1 and stats.n_recalls == 1
    assert "86556" in answer and stats.bytes_used <= stats.bytes_budget
    llm.close()


def spill_resident_bytes() -> int:
    """Resident bytes of this process's spill file mappings (kv_spill="disk"): /proc/self/smaps."""
    total, in_spill = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping's first line: address range ... path
                in_spill = "arkv-spill-" in line
            elif in_spill and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_spill_to_disk_keeps_no_page_of_the_file_resident(smollm2: Path,
                                                            tmp_path: Path) -> None:
    # the rows plans wrote and the recall pass read stay in the file (the page cache), not in
    # the process: RSS is bounded by the budget whatever the spill holds
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=256, n_ctx=1536, kv_spill="disk",
                kv_spill_dir=tmp_path, n_threads=2, verbose=False)
    assert "86556" in ask(llm, 86556, 0.1)
    stats = llm.kv_stats()
    assert stats.bytes_spill > 2**20 and stats.n_recalls == 1
    assert spill_resident_bytes() <= 16 * 4096  # a few pages of scores at most
    # a saved and loaded state maps the file's pages (llama.cpp copies the rows after the cache
    # wrote its state); the next question's plans let them go
    llm.load_state(llm.save_state())
    assert "67326" in ask(llm, 67326, 0.3)
    assert spill_resident_bytes() <= 16 * 4096
    llm.close()


def test_a_saved_state_holds_the_spilled_rows(tiny_llama: Path) -> None:  # noqa: F811
    rng = np.random.default_rng(SEED)
    llm, mem = open_memory(tiny_llama, cap_s=128)
    llm.eval(random_tokens(tiny_llama, N_PAST, rng))
    mem.submit(split_plan(mem, rng, spill=True)[0])
    llm.eval(random_tokens(tiny_llama, 1, rng))  # applies the plan
    saved, rows = llm.save_state(), cache_rows(llm, mem)
    assert rows[0]["pos_s"].shape == (N_S, mem.n_head_kv)
    llm.reset()
    llm.eval(random_tokens(tiny_llama, 50, rng))  # another sequence, nothing spilled
    assert all(info.n_s == 0 for info in mem.layers())
    llm.load_state(saved)
    for a, b in zip(rows, cache_rows(llm, mem), strict=True):
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    # a cache with a smaller spill refuses it (the log names the spill's size)
    small, _ = open_memory(tiny_llama, cap_s=16)
    with pytest.raises(RuntimeError, match="Failed to set"):
        small.load_state(saved)
    del llm, small


def test_the_spill_holds_the_window_or_the_bytes_given(smollm2: Path) -> None:
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=256, verbose=False)  # window: trained
    assert llm._tailor.params.cap_s == llm.n_ctx() == 8192
    # a 4-bit token of SmolLM2 costs 30 layers x 2 x 192 / 32 x 18 bytes = 6480
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=256, n_ctx=1024,
                kv_spill_bytes=6480 * 100 + 1, verbose=False)
    assert llm._tailor.params.cap_s == 100
    assert Llama(smollm2, kv_policy="arkv", kv_budget=256, n_ctx=1024, kv_spill=None,
                 verbose=False)._tailor.params.cap_s == 0


def test_plans_fit_the_compute_buffer_reserved_for_decoding(smollm2: Path,
                                                            capfd: pytest.CaptureFixture) -> None:
    # a 3,000-token read at a quarter of the bytes plans every chunk and recalls at its end; the
    # graphs that move rows must fit the buffer llama.cpp reserved (a staging tensor made a leaf
    # kept every layer's staging live at once: the buffer grew to 3x, and llama.cpp warns at close)
    llm = Llama(smollm2, kv_policy="arkv", kv_budget=750, n_ctx=3072, n_threads=2,
                verbose=False)
    llm.eval(bench_text_tokens(llm, 3000))
    stats = llm.kv_stats()
    assert stats.n_tailorings >= 5 and stats.n_recalls == 1 and stats.bytes_spill > 0
    llm.close()
    assert "does not match expectation" not in capfd.readouterr().err
