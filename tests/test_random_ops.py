"""A seeded random walk over the tri-state KV memory's operations, checked after every step.

Decodes (that fit and that do not), random valid plans, invalid plans, seq_rm, clears and state
save/load run in random order on a tiny model with a small budget, so that plans are frequent
and layouts change all the time. A Python model predicts, slot by slot, which position each
(layer, KV head) holds in O and in Q; every step compares it with what the module reports and
checks the invariants that hold whatever the model says (byte accounting, -1 padding, unique
positions, only O->Q, O->E and Q->E transitions), and the logits (finite; bit-identical when a
saved state is decoded again).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
import pytest

import arkv_local  # noqa: F401  (binds llama_cpp to our library)
from arkv_local.memory import LayerPlan, MemoryParams, TriStateKV, open_llama
from arkv_local.policies import Budget
from arkv_local.tiny_models import tiny_model_path

SEED = 1234
N_STEPS = 1000
N_CTX = 4096
MAX_CHUNK = 24
N_BATCH = 1024  # one llama_decode per eval, even for the chunks that must not fit
HEAD_DIM = 64
# K+V bytes of one f16 token of one layer: K and V, 2 KV heads of 64 values, 2 bytes each
F16_TOKEN_BYTES = 2 * 2 * HEAD_DIM * 2
BUDGETS = [160, 640]  # f16 tokens per layer; 640 > 256: O is read padded to 256 rows


@pytest.fixture(scope="module")
def tiny_llama() -> str:
    return str(tiny_model_path("llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512))


@dataclass
class Expected:
    """What the memory should hold: per layer, the position of every used (slot, head)."""

    cap_o: list[int]
    o: list[np.ndarray]  # (n_o, n_head_kv)
    q: list[np.ndarray]  # (n_q, n_head_kv)
    pos_max: int = -1
    pos_planned_max: int = -1  # pos_max when the last plan was applied
    pending: list[LayerPlan] | None = None
    removal_pending: bool = False  # a seq_rm moved the metadata, the rows follow at the next update
    # per (layer, head): the last state seen of every position still in the sequence,
    # "O", "Q" or "E" (evicted); the transition check reads it
    seen: list[list[dict[int, str]]] = field(default_factory=list)
    # per (layer, head): positions a cut moved from Q back to O (their values stay 4-bit ones)
    up: list[list[set[int]]] = field(default_factory=list)

    def pos_min(self) -> int:
        kept = [a.min() for a in self.o + self.q if a.size]
        return int(min(kept)) if kept else -1

    def apply_pending(self) -> None:
        """A decode (even one that then fails to fit) applies the pending plan first."""
        if self.pending is None:
            return
        for li, p in enumerate(self.pending):
            o, q = self.o[li], self.q[li]
            heads = np.arange(o.shape[1])
            self.o[li] = o[p.o_src, heads] if len(p.o_src) else o[:0]
            q_new = np.empty(p.q_src.shape, np.int64)
            for i, j in np.ndindex(p.q_src.shape):
                q_new[i, j] = (o if p.q_from[i, j] else q)[p.q_src[i, j], j]
            self.q[li] = q_new
            self.cap_o[li] = p.cap_o
        self.pending = None
        self.removal_pending = False
        self.pos_planned_max = self.pos_max

    def free_after_pending(self) -> int:
        """Free O slots the next decode will see."""
        if self.pending is None:
            return min(c - len(o) for c, o in zip(self.cap_o, self.o, strict=True))
        return min(p.cap_o - len(p.o_src) for p in self.pending)

    def decode(self, n: int) -> None:
        self.apply_pending()
        self.removal_pending = False
        new = np.arange(self.pos_max + 1, self.pos_max + 1 + n)
        for li, o in enumerate(self.o):
            self.o[li] = np.concatenate([o, np.repeat(new[:, None], o.shape[1], 1)])
        self.pos_max += n

    def clear(self) -> None:
        self.o = [o[:0] for o in self.o]
        self.q = [q[:0] for q in self.q]
        self.pos_max = self.pos_planned_max = -1
        self.pending = None
        self.removal_pending = False

    def truncate(self, p0: int) -> None:
        """Drop positions >= p0: decoded after the last plan, so the newest O rows."""
        n_rm = self.pos_max - p0 + 1
        for li, o in enumerate(self.o):
            assert (o[len(o) - n_rm:] >= p0).all()
            self.o[li] = o[:len(o) - n_rm]
        self.pos_max = p0 - 1

    def holds(self, p0: int, p1: int = N_CTX) -> bool:
        """Whether any row is at a position in [p0, p1)."""
        return any(((a >= p0) & (a < p1)).any() for a in self.o + self.q)

    def heads_lose_alike(self, p0: int, p1: int = N_CTX) -> bool:
        """Whether every head of each layer holds as many rows at positions in [p0, p1)."""
        def lost(a: np.ndarray) -> np.ndarray:
            return ((a >= p0) & (a < p1)).sum(0)
        return all(len(set((lost(o) + lost(q)).tolist())) <= 1
                   for o, q in zip(self.o, self.q, strict=True))

    def moves_on_removal(self, p0: int, p1: int = N_CTX) -> bool:
        """Whether removing [p0, p1) changes the layout: it holds rows, or (the move sorts O
        by position) some head's O rows are out of position order."""
        return self.holds(p0, p1) or any((np.diff(o, axis=0) < 0).any() for o in self.o)

    def remove(self, p0: int, p1: int = N_CTX) -> None:
        """Drop positions in [p0, p1) from every pool (llama-arkv's removal_move): each head
        keeps its other rows in their pools; where heads keep different O counts, a head's
        newest Q rows go up into O until it has as many as the head with the most. O rows end
        in position order, Q rows in slot order. The rows follow at the next update."""
        for li, (o, q) in enumerate(zip(self.o, self.q, strict=True)):
            H = o.shape[1]
            ko = [o[:, h][(o[:, h] < p0) | (o[:, h] >= p1)] for h in range(H)]
            kq = [q[:, h][(q[:, h] < p0) | (q[:, h] >= p1)] for h in range(H)]
            t_o = max((len(k) for k in ko), default=0)
            o_new, q_new = [], []
            for h in range(H):
                up = set(np.sort(kq[h])[::-1][: t_o - len(ko[h])].tolist())
                self.up[li][h] |= up
                o_new.append(np.sort(np.concatenate([ko[h], sorted(up)]).astype(np.int64)))
                q_new.append(np.array([p for p in kq[h] if p not in up], np.int64))
            self.o[li] = np.stack(o_new, 1) if H else o[:0]
            self.q[li] = np.stack(q_new, 1) if H else q[:0]
        self.pos_planned_max = self.pos_max
        self.removal_pending = True
        if self.pos_min() < 0:
            self.clear()  # nothing left: the memory clears itself

    def cut(self, p0: int) -> None:
        """Drop positions >= p0 from a tailored cache; the sequence ends before p0."""
        if self.moves_on_removal(p0):
            self.remove(p0)
        if self.pos_max >= 0:
            self.pos_max = self.pos_planned_max = p0 - 1

    def shift_back(self, p1: int, d: int) -> None:
        """seq_add(p1, -1, -d): rows at positions >= p1 move back by d (their K rotated at the
        next update); what the transition check remembers moves with them."""
        if not self.holds(p1):
            return  # no row moved: the memory leaves pos_max as it is
        for a in self.o + self.q:
            a[a >= p1] -= d
        for layer in self.seen:
            for h, seen in enumerate(layer):
                layer[h] = {(p - d if p >= p1 else p): s for p, s in seen.items()
                            if p < p1 - d or p >= p1}
        for layer in self.up:
            for h, up in enumerate(layer):
                layer[h] = {p - d if p >= p1 else p for p in up if p < p1 - d or p >= p1}
        self.pos_max = self.pos_planned_max = self.pos_max - d
        self.removal_pending = True


class Walk:
    """The context, its memory and the expected state, with one method per operation."""

    def __init__(self, path: str, budget_tokens: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.budget = budget_tokens * F16_TOKEN_BYTES
        self.llm = open_llama(path, MemoryParams(budget_bytes=self.budget), n_ctx=N_CTX,
                              n_batch=N_BATCH, n_threads=1, n_threads_batch=1, logits_all=True,
                              verbose=False)  # one thread: tiny matrices, shared CPUs
        self.mem = TriStateKV(self.llm.ctx)
        self.memory = llama_cpp.llama_get_memory(self.llm.ctx)
        self.H = self.mem.n_head_kv
        self.n_vocab = self.llm.n_vocab()
        # per K or per V arena: the O pool (f16) then, 64-byte aligned, the Q pool (Q4_0)
        self.layout = Budget(self.budget, self.mem.slot_bytes_o, self.mem.slot_bytes_q)
        self.cap_o_max = self.layout.cap_o_max
        L = self.mem.n_layer
        empty = np.zeros((0, self.H), np.int64)
        self.exp = Expected([self.cap_o_max] * L, [empty] * L, [empty] * L,
                            seen=[[{} for _ in range(self.H)] for _ in range(L)],
                            up=[[set() for _ in range(self.H)] for _ in range(L)])
        self.counts: dict[str, int] = {}

    def cap_q_for(self, cap_o: int) -> int:
        return self.layout.cap_q(cap_o)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, self.n_vocab, n).tolist()

    def snapshot(self) -> tuple[list, list, list]:
        pos_o, pos_q, _ = self.mem.positions()
        return self.mem.layers(), [a.copy() for a in pos_o], [a.copy() for a in pos_q]

    def assert_unchanged(self, before: tuple[list, list, list]) -> None:
        after = self.snapshot()
        assert after[0] == before[0]
        for a, b in zip(before[1] + before[2], after[1] + after[2], strict=True):
            np.testing.assert_array_equal(a, b)

    # operations

    def decode(self) -> None:
        free = self.exp.free_after_pending()
        room = N_CTX - self.llm.n_tokens
        if free == 0 or room == 0:
            return self.clear_if_full()
        n = int(self.rng.integers(1, min(MAX_CHUNK, free, room) + 1))
        n0 = self.llm.n_tokens
        self.llm.eval(self.tokens(n))
        self.exp.decode(n)
        assert np.isfinite(self.llm.scores[n0:n0 + n]).all(), "logits not finite"
        self.count("decode")

    def decode_too_much(self) -> None:
        free = self.exp.free_after_pending()
        n = int(self.rng.integers(free + 1, free + MAX_CHUNK + 1))
        if self.llm.n_tokens + n > N_CTX:
            return self.clear_if_full()
        before_n = self.llm.n_tokens
        with pytest.raises(RuntimeError, match="llama_decode returned 1"):
            self.llm.eval(self.tokens(n))
        assert self.llm.n_tokens == before_n
        # the pending plan was applied before the batch was found not to fit; nothing else moved
        self.exp.apply_pending()
        self.count("decode refused")

    def clear_if_full(self) -> None:
        """Start over when the context window runs out (rare: seq_rm usually gets there first)."""
        if N_CTX - self.llm.n_tokens < MAX_CHUNK:
            assert llama_cpp.llama_memory_seq_rm(self.memory, 0, 0, -1)
            self.exp.clear()
            self.llm.n_tokens = 0

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, bool(self.rng.random() < 0.5))
        self.exp.clear()
        self.llm.n_tokens = 0
        self.count("clear")

    def random_plan(self) -> list[LayerPlan]:
        """A valid plan: random cap_o and random O/Q/E choices per head, always keeping the
        newest position in O (as a policy's window does), equal counts in all heads."""
        plan = []
        for li in range(self.mem.n_layer):
            o, q = self.exp.o[li], self.exp.q[li]
            n_o, n_q = len(o), len(q)
            k_o = int(self.rng.integers(1, n_o + 1)) if n_o else 0
            room_q = self.cap_q_for(max(k_o, 1))  # most Q rows any cap_o >= k_o leaves
            k_qq = int(self.rng.integers(0, min(n_q, room_q) + 1))
            k_qo = int(self.rng.integers(0, min(n_o - k_o, room_q - k_qq) + 1))
            caps = [c for c in range(max(k_o, 1), self.cap_o_max + 1)
                    if self.cap_q_for(c) >= k_qq + k_qo]
            o_src = np.empty((k_o, self.H), np.int32)
            q_src = np.empty((k_qq + k_qo, self.H), np.int32)
            q_from_o = np.empty((k_qq + k_qo, self.H), bool)
            for h in range(self.H):
                # (after a cut the newest position may be in Q, or evicted)
                newest = np.flatnonzero(o[:, h] == self.exp.pos_max)[:1].tolist()
                others = self.rng.permutation([s for s in range(n_o) if s not in newest])
                keep = self.rng.permutation(np.concatenate([newest, others[:k_o - len(newest)]]))
                to_q = [(int(s), True) for s in others[k_o - len(newest):][:k_qo]]
                to_q += [(int(s), False) for s in self.rng.choice(n_q, k_qq, replace=False)]
                order = self.rng.permutation(len(to_q))
                o_src[:, h] = keep
                q_src[:, h] = [to_q[i][0] for i in order]
                q_from_o[:, h] = [to_q[i][1] for i in order]
            plan.append(LayerPlan(int(self.rng.choice(caps)), o_src, q_src, q_from_o))
        return plan

    def submit(self) -> None:
        plan = self.random_plan()
        self.mem.submit(plan)
        self.exp.pending = plan  # replaces any plan still pending
        self.count("plan")

    def submit_invalid(self) -> None:
        plan = self.random_plan()  # never applied
        li = int(self.rng.integers(self.mem.n_layer))  # the other layers' entries are valid
        n_o, n_q, H = len(self.exp.o[li]), len(self.exp.q[li]), self.H
        empty = np.zeros((0, H), np.int32)
        kinds = ["one entry per layer", "not in use", "outside"]
        if n_o >= 1:
            kinds += ["twice", "Q slots left"]
        if n_o >= 2:
            kinds.append("exceeds cap_o")
        kind = str(self.rng.choice(kinds))
        if kind == "one entry per layer":
            plan = plan[:-1] if self.rng.random() < 0.5 else plan + plan[:1]
        elif kind == "not in use":
            if n_o > 0 and self.rng.random() < 0.5:  # one head names the O slot past n_o
                bad = np.zeros((1, H), np.int32)
                bad[0, int(self.rng.integers(H))] = n_o
                plan[li] = LayerPlan(self.cap_o_max, bad, empty, empty)
            else:  # every head names the Q slot past n_q
                bad = np.full((1, H), n_q, np.int32)
                plan[li] = LayerPlan(1, empty, bad, np.zeros((1, H), bool))
        elif kind == "outside":
            plan[li] = LayerPlan(self.cap_o_max + 1 if self.rng.random() < 0.5 else 0,
                                 empty, empty, empty)
        elif kind == "twice":
            plan[li] = LayerPlan(self.cap_o_max, np.zeros((2, H), np.int32), empty, empty)
        elif kind == "Q slots left":  # all of the arena in O leaves no room for one Q row
            assert self.cap_q_for(self.cap_o_max) == 0, "the budget must fit O exactly here"
            plan[li] = LayerPlan(self.cap_o_max, empty, np.zeros((1, H), np.int32),
                                 np.ones((1, H), bool))
        else:  # two O rows for one O slot
            plan[li] = LayerPlan(1, np.repeat(np.arange(2, dtype=np.int32)[:, None], H, 1),
                                 empty, empty)
        before = self.snapshot()
        with pytest.raises(ValueError, match=kind):
            self.mem.submit(plan)
        self.assert_unchanged(before)  # and the plan pending before, if any, still is
        self.count("plan refused")

    def seq_rm(self) -> None:
        self.tail("seq_rm")

    def cut(self) -> None:
        self.tail("cut")

    def tail(self, op: str) -> None:
        """llama_memory_seq_rm(p0, -1) ("seq_rm"), or llama_arkv_cut_tail (TriStateKV.cut)."""
        e = self.exp
        # the boundaries of the rule, or anywhere
        special = [e.pos_min(), e.pos_planned_max, e.pos_planned_max + 1, e.pos_max, e.pos_max + 1]
        if self.rng.random() < 0.5:
            p0 = max(int(self.rng.choice(special)), 0)
        else:
            p0 = int(self.rng.integers(0, e.pos_max + 3))
        # the rule of llama-arkv: no cut while a plan is pending (it names the rows as they are);
        # a tail no plan has touched is the newest O rows; seq_rm refuses a tailored one (what
        # is left is not what a fresh read holds), a cut takes it out of every pool where every
        # head of each layer loses as many rows
        if p0 > e.pos_max:
            expected, what = True, "nothing"
        elif p0 <= e.pos_min():
            expected, what = True, "clear"
        elif p0 > e.pos_planned_max:
            expected, what = (False, "pending") if e.pending is not None else (True, "tail")
        elif op == "seq_rm":
            expected, what = False, "tailored"
        elif e.pending is not None and e.moves_on_removal(p0):  # (else nothing to move)
            expected, what = False, "pending"
        elif e.heads_lose_alike(p0):
            expected, what = True, "tailored"
        else:
            expected, what = False, "heads differ"
        before = self.snapshot()
        got = self.mem.cut(p0, exact=op == "seq_rm")
        assert got == expected, f"{op} from {p0}: pos min/planned max/max " \
            f"{e.pos_min()}/{e.pos_planned_max}/{e.pos_max}"
        if what == "clear":
            e.clear()
        elif what == "tail":
            e.truncate(p0)
        elif what == "tailored" and got:
            e.cut(p0)
        else:
            self.assert_unchanged(before)
        self.llm.n_tokens = e.pos_max + 1  # the next eval continues from the cache's end
        self.count(f"{op} {what}")

    def shift(self) -> None:
        """llama.cpp's context shift: seq_rm of a middle range [n_keep, n_keep + n_discard),
        then seq_add of what follows by -n_discard. The removal is refused, nothing changed,
        where heads would keep different counts or a plan is pending (and rows are in it)."""
        e = self.exp
        if e.pos_max < 1:
            return
        n_keep = int(self.rng.integers(0, e.pos_max))
        n_discard = int(self.rng.integers(1, e.pos_max - n_keep + 1))
        p1 = n_keep + n_discard  # <= pos_max: a middle range, not a tail
        removable = not e.moves_on_removal(n_keep, p1) or (e.pending is None and
                                                            e.heads_lose_alike(n_keep, p1))
        before = self.snapshot()
        got = llama_cpp.llama_memory_seq_rm(self.memory, 0, n_keep, p1)
        assert got == removable, f"seq_rm [{n_keep}, {p1}) of [{e.pos_min()}, {e.pos_max}]"
        if not got:
            self.assert_unchanged(before)
            return self.count("shift refused")
        if e.moves_on_removal(n_keep, p1):
            e.remove(n_keep, p1)
        llama_cpp.llama_memory_seq_add(self.memory, 0, p1, -1, -n_discard)
        if e.pos_max >= 0:
            e.shift_back(p1, n_discard)
        self.llm.n_tokens = e.pos_max + 1
        self.count("shift")

    def save_load(self) -> None:
        """Save, go on (decodes, plans, perhaps one left pending), load: the state is back and
        the first decode after the save is reproduced bit for bit."""
        e = self.exp
        if e.pending is not None:  # a pending plan is not state: the reload would not apply it
            return
        if e.removal_pending:  # a state is saved once the rows follow their metadata
            self.mem.apply()
            e.removal_pending = False
        if e.free_after_pending() == 0 or self.llm.n_tokens + 1 > N_CTX:
            return
        state = self.llm.save_state()
        saved = copy.deepcopy(e)
        before = self.snapshot()
        n0 = self.llm.n_tokens
        tok = self.tokens(1)
        self.llm.eval(tok)
        first = self.llm.scores[n0].copy()
        e.decode(1)
        self.check()
        for _ in range(int(self.rng.integers(0, 4))):
            self.step(str(self.rng.choice(["decode", "submit", "seq_rm", "cut", "shift"])))
        self.llm.load_state(state)
        self.exp = saved  # and a plan pending before the load is dropped
        assert self.llm.n_tokens == n0
        self.assert_unchanged(before)
        self.check()
        self.llm.eval(tok)
        np.testing.assert_array_equal(self.llm.scores[n0], first)
        self.exp.decode(1)
        self.count("save/load")

    def step(self, op: str) -> None:
        {
            "decode": self.decode,
            "decode_too_much": self.decode_too_much,
            "submit": self.submit,
            "submit_invalid": self.submit_invalid,
            "seq_rm": self.seq_rm,
            "cut": self.cut,
            "shift": self.shift,
            "clear": self.clear,
            "save_load": self.save_load,
        }[op]()
        self.check()

    # invariants

    def check(self) -> None:
        e, mem = self.exp, self.mem
        infos = mem.layers()
        pos_o, pos_q, _ = mem.positions()
        assert self.llm.n_tokens == e.pos_max + 1
        assert llama_cpp.llama_memory_seq_pos_max(self.memory, 0) == e.pos_max
        assert llama_cpp.llama_memory_seq_pos_min(self.memory, 0) == e.pos_min()
        assert mem.free_slots() == e.free_after_pending()  # a pending plan's layout counts
        for li, info in enumerate(infos):
            # the layer's pools: counts within capacities, bytes that add up
            assert (info.cap_o, info.n_o, info.n_q) == (e.cap_o[li], len(e.o[li]), len(e.q[li]))
            assert info.cap_q == self.cap_q_for(info.cap_o)
            assert info.n_o <= info.cap_o and info.n_q <= info.cap_q
            assert info.bytes_alloc == self.budget
            assert info.bytes_used == info.n_o * mem.slot_bytes_o + info.n_q * mem.slot_bytes_q
            assert info.bytes_used <= info.bytes_alloc
            po, pq = pos_o[li], pos_q[li]
            assert po.shape == (info.cap_o, self.H) and pq.shape == (info.cap_q, self.H)
            # used rows hold positions, free rows -1; exactly the expected ones, slot by slot
            assert (po[info.n_o:] == -1).all() and (pq[info.n_q:] == -1).all()
            np.testing.assert_array_equal(po[:info.n_o], e.o[li], err_msg=f"O of layer {li}")
            np.testing.assert_array_equal(pq[:info.n_q], e.q[li], err_msg=f"Q of layer {li}")
            for h in range(self.H):
                held = np.concatenate([po[:info.n_o, h], pq[:info.n_q, h]])
                assert (held >= 0).all() and (held <= e.pos_max).all()
                assert len(np.unique(held)) == len(held), f"layer {li} head {h}: a position twice"
                self.check_transitions(e.seen[li][h], e.up[li][h], po[:info.n_o, h],
                                       pq[:info.n_q, h])

    def check_transitions(self, seen: dict[int, str], up: set[int], o: np.ndarray,
                          q: np.ndarray) -> None:
        """Only O->Q, O->E and Q->E: a position never comes back to O (but as the 4-bit values
        a cut moves up: `up`), nor out of eviction."""
        for p in [p for p in seen if p > self.exp.pos_max]:
            del seen[p]  # cut by seq_rm or a clear: the position may be decoded again
        up.difference_update([p for p in up if p > self.exp.pos_max])
        now = {int(p): "Q" if p in up else "O" for p in o} | {int(p): "Q" for p in q}
        allowed = {None: "O", "O": "OQ", "Q": "Q", "E": ""}
        for p, s in now.items():
            assert s in allowed[seen.get(p)], f"position {p}: {seen.get(p)} -> {s}"
        for p in seen:
            seen[p] = now.get(p, "E")
        seen.update(now)


OPS = ["decode", "decode_too_much", "submit", "submit_invalid", "seq_rm", "cut", "shift",
       "clear", "save_load"]
WEIGHTS = np.array([0.36, 0.06, 0.24, 0.1, 0.1, 0.1, 0.08, 0.03, 0.08])
OUTCOMES = ["decode", "decode refused", "plan", "plan refused", "seq_rm nothing", "seq_rm clear",
            "seq_rm pending", "seq_rm tailored", "seq_rm tail", "cut tailored", "cut heads differ",
            "cut pending", "shift", "shift refused", "clear", "save/load"]


def run_walk(path: str, budget_tokens: int) -> Walk:
    rng = np.random.default_rng(SEED + budget_tokens)
    walk = Walk(path, budget_tokens, rng)
    walk.check()
    for i in range(N_STEPS):
        op = str(rng.choice(OPS, p=WEIGHTS / WEIGHTS.sum()))
        try:
            walk.step(op)
        except AssertionError as err:
            raise AssertionError(f"step {i} ({op}): {err}") from err
    # the walk must have reached every kind of outcome, or it checked less than it claims
    for what in OUTCOMES:
        assert walk.counts.get(what, 0) >= 3, (what, walk.counts)
    return walk


@pytest.mark.parametrize("budget_tokens", BUDGETS)
def test_random_operations_keep_the_memory_consistent(tiny_llama: str, budget_tokens: int) -> None:
    """Any layout, any order: the bookkeeping, finite logits, bit-exact state reloads."""
    run_walk(tiny_llama, budget_tokens)
