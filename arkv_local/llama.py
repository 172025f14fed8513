"""`arkv_local.Llama`: llama_cpp.Llama over arkv_local's libllama, plus a KV-cache policy."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import numbers
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np

from . import arkv_cpp, defaults
from .memory import MemoryParams, TriStateKV, armed, quant_slot_bytes
from .models import ModelShape, check_gguf, default_model_path, gguf_load_errors, model_shape
from .policies import KV_POLICIES, Policy, make_policy
from .state import ArkvState
from .tailoring import KVStats, LayerKVStats, Tailor

__all__ = ["KV_POLICIES", "ContextWindowExceeded", "Llama"]

log = logging.getLogger("arkv_local")


class Llama(llama_cpp.Llama):
    """Drop-in for `llama_cpp.Llama` (same methods and arguments) with a KV-cache policy.

    `model_path` may be omitted: the default model (SmolLM2-135M-Instruct) is used.

    kv_policy: "full" (llama.cpp's own f16 cache, exactly), "arkv", "h2o", "window", "quant",
        or a `Policy` instance. Every policy but "full" keeps the cache in the tri-state
        memory under a fixed budget, whatever the number of positions.
    n_ctx (llama_cpp's): the context window, the positions a sequence may take (n_ctx() and
        max_tokens=-1 follow it; 0: the model's trained limit). With a policy and no n_ctx,
        positions run to the trained limit (to llama_cpp's 512 with logits_all=True, whose
        logits buffer grows with the window).
    kv_budget: KV memory as the number of tokens an f16 cache would hold (default: n_ctx if
        given, else 512); or kv_budget_bytes: KV bytes over all layers. At most n_ctx tokens'
        worth when n_ctx is given (the window never holds more).
    kv_window, kv_sinks, kv_slack: newest tokens kept in f16 (32), first tokens kept in f16
        (4), slots freed per tailoring (64, or 1/64 of the budget when larger: a plan's cost
        grows with the budget, so that decoding pays a like share for plans at any size).
    kv_quant: the 4-bit state's type, "q4_0" (default), "q4_1" or "q8_0".
    kv_rotate: Walsh-Hadamard rotation of the cached K/V (as llama.cpp's quantized caches).
    kv_observe: last queries of each ubatch whose attention is scored (32), for the policies
        that read scores or prefill statistics (ARKV's observation window).
    kv_spill: where rows that leave the budget go: "host" (default: 4-bit rows in RAM, or
        pinned host memory beside a GPU), "disk" (a memory-mapped file in kv_spill_dir,
        unlinked at once) or None (evicted for good, as the paper). Spilled rows are read again
        by the last kv_observe tokens of every prompt (the question), and the plan after that
        brings back the rows they attend to.
    kv_spill_bytes: the most bytes spilled rows take over all layers (default: enough for
        every position of the window); past it the lowest-scored spilled rows are evicted.
    arkv_tau, arkv_gamma: ARKV's layer-score exponents and heavy-hitter variance weight
        ((0.1, 0.3, 0.6) and 0.8: the reference's instruct values).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        kv_policy: str | Policy = "full",
        kv_budget: int | None = None,
        kv_budget_bytes: int | None = None,
        kv_window: int | None = None,
        kv_sinks: int | None = None,
        kv_slack: int | None = None,
        kv_quant: str = defaults.QUANT,
        kv_rotate: bool = defaults.ROTATE,
        kv_observe: int = defaults.OBSERVE,
        kv_spill: str | None = defaults.SPILL,
        kv_spill_bytes: int | None = None,
        kv_spill_dir: str | os.PathLike[str] | None = None,
        arkv_tau: tuple[float, float, float] | None = None,
        arkv_gamma: float | None = None,
        **kwargs: Any,
    ) -> None:
        # what pickle and copy rebuild the object from (llama_cpp's __getstate__ adds its own)
        self._knobs = dict(kv_policy=kv_policy, kv_budget=kv_budget,
                           kv_budget_bytes=kv_budget_bytes, kv_window=kv_window,
                           kv_sinks=kv_sinks, kv_slack=kv_slack, kv_quant=kv_quant,
                           kv_rotate=kv_rotate, kv_observe=kv_observe, kv_spill=kv_spill,
                           kv_spill_bytes=kv_spill_bytes, kv_spill_dir=kv_spill_dir,
                           arkv_tau=arkv_tau, arkv_gamma=arkv_gamma)
        self._n_ctx_given = kwargs.get("n_ctx")  # None: not given (the window then differs)
        for name in ("kv_budget", "kv_budget_bytes", "kv_window", "kv_sinks", "kv_slack",
                     "kv_spill_bytes"):
            _check_count(name, self._knobs[name])
        _check_count("kv_observe", kv_observe, optional=False)
        if not isinstance(kv_rotate, bool):
            raise TypeError(f"kv_rotate must be True or False, got {kv_rotate!r}")
        n_ctx_arg = kwargs.get("n_ctx", 0)
        if isinstance(n_ctx_arg, bool) or not isinstance(n_ctx_arg, numbers.Integral) \
                or n_ctx_arg < 0:
            raise ValueError(f"n_ctx must be a number of tokens >= 0 (0: the model's trained "
                             f"length), got {n_ctx_arg!r}")
        path = default_model_path() if model_path is None else check_gguf(model_path)
        policy = make_policy(kv_policy, window=kv_window, sinks=kv_sinks, slack=kv_slack,
                             tau=arkv_tau, gamma=arkv_gamma)
        self.kv_policy = kv_policy if isinstance(kv_policy, str) else policy.name
        self._tailor: Tailor | None = None
        self._reading_prompt = False  # generate is reading its prompt (see _first)
        self._answering = False  # generate is past its prompt: evals are its tokens and drafts
        self.progress_bar = bool(kwargs.get("verbose", True))  # while reading long prompts
        if policy is None and (kv_budget is not None or kv_budget_bytes is not None):
            raise ValueError("kv_budget needs a kv_policy other than 'full'")
        spill_dir = check_spill(kv_spill, kv_spill_bytes, kv_spill_dir)
        if policy is None or kwargs.get("vocab_only", False):
            # "full", or a tokenizer-only load: no KV cache for a policy to manage
            with gguf_load_errors(path):
                super().__init__(os.fspath(path), **kwargs)
            return

        if kwargs.get("embedding", False):
            raise ValueError(
                "embedding=True reads several inputs at once, a sequence each, and a KV policy's "
                "memory serves one sequence: use kv_policy='full' for embeddings (each input is "
                "read once within n_batch tokens: there is no cache to bound)")
        for name in ("type_k", "type_v"):  # llama.cpp's cache type: the policy has its own
            t = kwargs.get(name)
            if t is not None and t != llama_cpp.GGML_TYPE_F16:
                raise ValueError(
                    f"{name}={t} ({ggml_type_name(t)}): under a KV policy the cache keeps f16 "
                    f"rows and 4-bit rows of kv_quant={kv_quant!r}; leave {name} unset, or use "
                    "kv_policy='full' for llama.cpp's quantized cache")
        shape = model_shape(path)
        n_ctx = kwargs.get("n_ctx", 512) or shape.n_ctx_train  # llama_cpp: 0 is the trained limit
        layer_bytes = _layer_budget(shape.f16_slot_bytes, shape.n_layer, kv_budget,
                                    kv_budget_bytes, n_ctx)
        if "n_ctx" in kwargs:  # the window (n_ctx, rounded up to 256 as llama.cpp does) holds
            # at most that many tokens: bytes past them would never serve
            most = max(-(-n_ctx // 256) * 256, policy.min_budget_tokens()) * shape.f16_slot_bytes
            layer_bytes = min(layer_bytes, most)
        if kv_slack is None and isinstance(kv_policy, str):
            policy.slack = defaults.slack_for(layer_bytes // shape.f16_slot_bytes)
        if layer_bytes < policy.min_budget_tokens() * shape.f16_slot_bytes:
            raise ValueError(
                f"a KV budget of {layer_bytes // shape.f16_slot_bytes} tokens is below the window "
                f"({policy.window}) + sinks ({policy.sinks}) + slack ({policy.slack}) = "
                f"{policy.min_budget_tokens()} tokens")
        # attention statistics cost a second QK^T per token: only for policies that read them
        observes = policy.needs_scores or policy.needs_stats
        if kv_observe < int(observes):
            raise ValueError(f"kv_observe must be >= {int(observes)} with kv_policy "
                             f"{self.kv_policy!r}, got {kv_observe}")
        params = MemoryParams(budget_bytes=layer_bytes, quant=kv_quant, rotate=kv_rotate,
                              n_score_queries=kv_observe if observes else 0)
        if "n_ctx" not in kwargs and not kwargs.get("logits_all", False) \
                and shape.n_ctx_train > 0:
            kwargs["n_ctx"] = shape.n_ctx_train  # no window asked for: run past the cache
        cap_s = spill_slots(kv_spill, kv_spill_bytes, shape, kv_quant,
                            kwargs.get("n_ctx", 512) or shape.n_ctx_train)
        if cap_s and kv_observe < 1:
            raise ValueError(f"kv_spill={kv_spill!r} needs kv_observe >= 1 (the queries that "
                             "recall spilled rows); pass kv_spill=None to evict instead")
        params = dataclasses.replace(params, cap_s=cap_s, spill_dir=spill_dir)
        # no decode is larger than the chunks a read takes: llama.cpp reserves its compute
        # buffer for n_ubatch tokens (logits included), so n_ubatch is the largest chunk
        kwargs["n_ubatch"] = min(kwargs.get("n_ubatch", 512),
                                 policy.read_chunk(layer_bytes // shape.f16_slot_bytes))
        with gguf_load_errors(path), armed(params):
            super().__init__(os.fspath(path), **kwargs)
        self._n_ctx_train = shape.n_ctx_train
        kv = TriStateKV(self.ctx)
        self._tailor = Tailor(kv, policy, params, llama_cpp.llama_model_n_head(self.model),
                              recall_tokens=kv_observe, threads=self.n_threads_batch)

    def eval(self, tokens: Sequence[int]) -> None:
        """As llama_cpp.Llama.eval; with a policy, the cache is tailored to its budget as the
        tokens come, so a prompt of any length is read in bounded memory."""
        if self._tailor is None:
            return super().eval(tokens)
        tokens = list(tokens)
        if not tokens:
            return
        memory = llama_cpp.llama_get_memory(self.ctx)
        held = llama_cpp.llama_memory_seq_pos_max(memory, 0) + 1
        if held < self.n_tokens or not self._tailor.cut(self.n_tokens, held - 1,
                                                        exact=not self._tailor.session.dropped):
            # the cache lost its rows (an update that failed cleared it), or its tail is not
            # cut: re-read the kept prefix from scratch, as a fresh object would
            tokens = self.input_ids[: self.n_tokens].tolist() + tokens
            self.n_tokens = 0
        # one token is decoded (the fused kernel), unless generate reads it as its prompt; more
        # are a prompt, read with llama.cpp's attention in chunks of any size: a prompt then
        # ends on the same logits however much of it the cache held, and a greedy answer does
        # not depend on the prompt cache
        self._tailor.kv.set_prompt(len(tokens) > 1 or self._reading_prompt)
        if self.n_tokens == 0:
            llama_cpp.llama_memory_clear(memory, True)
            self._tailor.start_sequence()
        step = min(self.n_batch, self._tailor.max_chunk)
        bar = None
        if self.progress_bar and len(tokens) > 4 * step:
            from tqdm import tqdm

            bar = tqdm(total=len(tokens), desc="reading prompt", unit="token", file=sys.stderr)
        # a prompt's last tokens also read the spilled rows: the question recalls what it needs.
        # Not a sampled token and its drafts (a draft model's): llama_cpp samples each of them
        # from the logits of the eval's last batch, so it is one batch
        tail = 0 if self._answering else max(0, min(len(tokens) - 1, self._tailor.recall_tokens))
        stop, i = len(tokens), 0
        while i < stop:
            n = self._make_room(min(step, stop - i))
            if tail and i + n > len(tokens) - tail:  # the chunk reaches the prompt's last tokens
                if self._tailor.kv.free_slots() < n:
                    self._tailor.before_decode(n, self.n_tokens - 1)  # its plan, which may spill
                if self._tailor.spilled():  # they read every row, spilled ones too: a recall
                    stop = max(i, len(tokens) - tail)
                    tail = len(tokens) - stop
                    continue
            # a read may end after this chunk: the prompt's end, or the tail's start (a recall)
            end = i + n in (stop, len(tokens) - tail)
            self._tailor.before_decode(n, self.n_tokens - 1, 0 if end else min(step, stop - i - n))
            super().eval(tokens[i : i + n])
            i += n
            if bar is not None:
                bar.update(n)
        if stop < len(tokens):
            while self._make_room(tail) < tail:  # the tail is read in one pass
                pass
            self._tailor.recall(tail, self.n_tokens - 1,
                                lambda: super(Llama, self).eval(tokens[stop:]))
        if bar is not None:
            bar.close()
        self._tailor.end_of_prompt()

    def _make_room(self, n: int) -> int:
        """How many of n new tokens the window takes now; when it is full, a context shift
        first (as llama.cpp's: the policy's sinks stay, half of the other positions leave and
        the later rows move back), so that a sequence goes on past n_ctx in the same memory."""
        room = self._n_ctx - self.n_tokens
        if room >= n:
            return n
        assert self._tailor is not None
        n_keep = self._tailor.policy.sinks
        n_discard = min((self._n_ctx - n_keep) // 2, self.n_tokens - n_keep)
        if n_discard < 1:
            raise ValueError(f"{n} tokens do not fit a context window of {self._n_ctx} "
                             f"positions after {self.n_tokens} (the policy keeps its first "
                             f"{n_keep})")
        end, ids = self.n_tokens, self.input_ids
        self._tailor.shift(n_keep, n_discard, ids[n_keep : n_keep + n_discard].tolist(),
                           pos_max=end - 1)
        ids[n_keep : end - n_discard] = ids[n_keep + n_discard : end].copy()
        if self._logits_all:
            self.scores[n_keep : end - n_discard] = self.scores[n_keep + n_discard : end].copy()
        self.n_tokens = end - n_discard
        return min(n, room + n_discard)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """As llama_cpp.Llama.generate; with a policy it goes on past the window (context
        shifts) with the same sampler, so penalties and grammars carry on."""
        if self._tailor is None:
            return super().generate(tokens, *args, **kwargs)
        call = _GENERATE.bind(self, tokens, *args, **kwargs)
        call.apply_defaults()
        options = {k: v for k, v in call.arguments.items() if k not in ("self", "tokens")}
        return self._generate_past_window(list(tokens), options)

    def _generate_past_window(self, tokens: list[int], options: dict[str, Any]) -> Iterator[int]:
        # llama_cpp's generate reads the prompt in one eval and then samples at its last
        # position: a prompt past the window is read here first (eval shifts as it goes)
        reset = options.pop("reset")
        if len(tokens) + (0 if reset else self.n_tokens) > self._n_ctx:
            if not reset or _common_prefix(tokens, self.input_ids[: self.n_tokens]) \
                    == self.n_tokens:
                tokens = tokens[self.n_tokens if reset else 0 :]  # continues the cache
            else:
                self.reset()
            self.eval(tokens)
            tokens, reset = [], False
        carried = None  # the sampler of the generation a context shift interrupted
        while True:
            inner = super().generate(tokens, reset=reset, **options)
            try:
                token = _first(inner, self, carried)
                while True:
                    sent = yield token
                    tokens = [token, *(sent or [])]
                    if self.n_tokens + len(tokens) > self._n_ctx:
                        break
                    self._answering = True
                    try:
                        token = inner.send(sent)
                    finally:
                        self._answering = False
            except StopIteration:
                return
            carried = self._sampler
            inner.close()
            self._make_room(len(tokens))
            reset = False

    def _init_sampler(self, *args: Any, **kwargs: Any) -> Any:
        """As llama_cpp.Llama's; first frees the sampler it replaces, which is a reference
        cycle (see _free_sampler) that would otherwise wait for Python's rare full collection."""
        _free_sampler(self._sampler)
        self._sampler = None
        return super()._init_sampler(*args, **kwargs)

    def create_completion(self, prompt: str | list[int], *args: Any,
                          **kwargs: Any) -> Any:
        """As llama_cpp.Llama.create_completion; with a policy, a prompt of tokens (as the chat
        handlers send) that continues the sequence past context shifts reads only what is
        new, after a shift that leaves max_tokens of room."""
        if self._tailor is None or not isinstance(prompt, list) or not prompt:
            return super().create_completion(prompt, *args, **kwargs)
        call = _COMPLETION.bind(self, prompt, *args, **kwargs)
        call.apply_defaults()
        options = {k: v for k, v in call.arguments.items() if k not in ("self", "prompt")}
        if options["suffix"] is None and not options["echo"] and options["logprobs"] is None:
            prompt = self._held_prompt(prompt, options["max_tokens"])
        if len(prompt) >= self._n_ctx:
            raise ContextWindowExceeded(f"Requested tokens ({len(prompt)}) exceed context "
                                        f"window of {self._n_ctx}")
        return super().create_completion(prompt, **options)

    def _held_prompt(self, prompt: list[int], max_tokens: int | None) -> list[int]:
        """`prompt` as the cache holds its history (the tokens shifts took out are not sent
        again), the window shifted first if the answer would not fit."""
        s, n_keep = self._tailor.session, self._tailor.policy.sinks
        held = self.input_ids[: self.n_tokens]
        if s.dropped:
            history = np.concatenate([held[:n_keep], s.dropped, held[n_keep:]])
            m = _common_prefix(prompt, history)
            if m > n_keep + len(s.dropped):
                m -= len(s.dropped)
                prompt = held[:m].tolist() + prompt[m + len(s.dropped) :]
                if m < self.n_tokens:  # it leaves the history before the cache's end
                    self._cut(m)
                    held = self.input_ids[: self.n_tokens]
        m = _common_prefix(prompt, held)
        new, answer = len(prompt) - m, max(max_tokens or 0, 0)
        if m > n_keep and new > 0 and len(prompt) + answer >= self._n_ctx:
            if m < self.n_tokens:
                self._cut(m)  # the history reads back otherwise from m on: the tail leaves
            self._make_room(new + answer + 1)
            prompt = self.input_ids[: self.n_tokens].tolist() + prompt[-new:]
        return prompt

    def _cut(self, n: int) -> None:
        """Keep the cache's first n positions and the history the shifts took out before them
        (an answer read back tokenized otherwise, say): the tail leaves the cache, whatever
        plans did to it, so only what follows is read; the sequence stays the one its history
        says (were the cut refused, the kept positions would be read again)."""
        memory = llama_cpp.llama_get_memory(self.ctx)
        if self._tailor.cut(n, llama_cpp.llama_memory_seq_pos_max(memory, 0)):
            self.n_tokens = n
            return
        session = self._tailor.session
        dropped, prefix = session.dropped, self.input_ids[:n].tolist()
        self.n_tokens = 0
        self.eval(prefix)
        session.dropped = dropped

    def create_chat_completion(self, messages: list[Any], *args: Any, **kwargs: Any) -> Any:
        """As llama_cpp.Llama.create_chat_completion; with a policy, a history longer than the
        window loses its oldest turns (system messages stay), as llama.cpp's server
        truncates, and a log line says so."""
        if self._tailor is None:
            return super().create_chat_completion(messages, *args, **kwargs)
        sent = list(messages)
        while True:
            try:
                out = super().create_chat_completion(sent, *args, **kwargs)
            except ContextWindowExceeded:
                shorter = _without_oldest_turn(sent)
                if shorter is None:
                    raise
                sent = shorter
                continue
            if len(sent) < len(messages):
                log.warning("arkv_local: the chat history passes the context window of %d "
                            "tokens: its %d oldest messages were left out",
                            self._n_ctx, len(messages) - len(sent))
            return out

    def kv_stats(self) -> KVStats:
        """KV memory in use and per layer O/Q/E counts (with "full": the f16 cache's)."""
        # positions the cache holds (after reset(), llama_cpp's n_tokens is 0 before they go)
        n = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(self.ctx), 0) + 1
        if self._tailor is not None:
            return self._tailor.kv_stats(n)
        shape = model_shape(self.model_path)
        per_token = shape.f16_slot_bytes * shape.n_layer
        layers = [LayerKVStats(n, 0, 0, 1.0, n * shape.f16_slot_bytes)
                  for _ in range(shape.n_layer)]
        return KVStats(n * per_token, self._n_ctx * per_token, n * per_token, n, layers, 0, 0.0)

    def save_state(self) -> ArkvState:
        """As llama_cpp.Llama.save_state, plus the policy's Python side (statistics, ratios,
        its memory, counters) as plain data: llama_cpp's prompt caches keep both."""
        if self._tailor is None:
            return ArkvState(super().save_state(), None)
        self._tailor.kv.apply()  # a plan still pending is part of the state
        return ArkvState(super().save_state(), self._tailor.session.snapshot())

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """As llama_cpp.Llama.load_state; with a policy its Python side comes back too, so that
        it decides with the loaded conversation's numbers (ValueError if the state has none)."""
        saved = getattr(state, "session", None)
        state = self._fit_state(state)
        if self._tailor is None:
            if saved is not None:  # llama.cpp's cache cannot read a tri-state one
                raise ValueError(f"the state was saved under kv_policy {saved['policy']!r}, not "
                                 "kv_policy 'full': load it into a Llama with that policy")
            return super().load_state(state)
        if saved is None:
            raise ValueError(f"this state has no Python side for kv_policy {self.kv_policy!r}: "
                             "save it with arkv_local.Llama.save_state under that policy")
        session = self._tailor.session
        before = session.snapshot()
        session.restore(saved)  # checks it first: nothing has changed if it raises
        arkv_cpp.llama_arkv_clear_error()
        try:
            super().load_state(state)
        except BaseException as e:
            # llama_cpp set its Python side to the state's, llama.cpp may have read part of it:
            # start over empty rather than answer from a cache the tokens do not describe
            self.n_tokens = 0
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
            session.restore(before)
            why = arkv_cpp.llama_arkv_last_error().decode()
            if why and isinstance(e, RuntimeError):
                raise RuntimeError(f"the state was not loaded: {why}; the cache was "
                                   "cleared") from e
            raise

    def _fit_state(self, state: llama_cpp.LlamaState) -> llama_cpp.LlamaState:
        """The state with its token and logit arrays sized for this object's window (llama_cpp
        takes them as saved: a state of a smaller window left input_ids too short for the next
        eval); ValueError if its tokens do not fit the window."""
        n = int(state.n_tokens)
        if n > self.n_ctx():
            raise ValueError(f"the state holds {n} tokens, more than this Llama's window of "
                             f"{self.n_ctx()} (n_ctx)")
        fitted = copy.copy(state)
        fitted.input_ids = np.zeros(self.n_ctx(), np.intc)
        fitted.input_ids[:n] = state.input_ids[:n]
        rows = min(n, self.scores.shape[0])  # llama_cpp writes them to scores[:n]
        fitted.scores = np.zeros((rows, self.scores.shape[1]), np.single)
        k = min(rows, len(state.scores))
        fitted.scores[:k] = state.scores[:k]
        return fitted

    def __getstate__(self) -> dict[str, Any]:
        """As llama_cpp.Llama's (the constructor's arguments) with the KV policy's: a pickled
        or copied Llama comes back with the same policy and knobs, and an empty cache."""
        state = {**super().__getstate__(), **copy.deepcopy(self._knobs)}
        state.pop("n_ctx")  # the context's may be the trained length a policy chose
        if self._n_ctx_given is not None:
            state["n_ctx"] = self._n_ctx_given
        return state

    def close(self) -> None:
        """As llama_cpp.Llama.close; also safe when __init__ refused its arguments early."""
        if hasattr(self, "_stack"):
            super().close()

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, repo_id: str, filename: str | None, *args: Any, **kwargs: Any
    ) -> Llama:
        """As llama_cpp.Llama.from_pretrained (huggingface-hub). A failed download raises
        ConnectionError naming the repo and file; a model that does not load then raises its
        own error, as Llama(model_path) would."""
        def downloaded(model_path: str, **llama_kwargs: Any) -> tuple[str, dict[str, Any]]:
            return model_path, llama_kwargs

        # llama_cpp's own steps (file search, download, cache), with `cls` standing for the load
        # (llama_cpp.llama.Llama: code that swaps llama_cpp.Llama for this class still works)
        fetch = llama_cpp.llama.Llama.from_pretrained.__func__  # type: ignore[attr-defined]
        try:
            model_path, llama_kwargs = fetch(downloaded, repo_id, filename, *args, **kwargs)
        except (ValueError, TypeError, ImportError):
            raise  # no such file in the repo, a bad repo id or argument, no huggingface-hub
        except Exception as e:  # huggingface-hub raises transport-specific errors
            raise ConnectionError(
                f"could not fetch {filename!r} from the Hugging Face Hub repo {repo_id!r} "
                f"({type(e).__name__}: {e}); without network, download the GGUF elsewhere "
                "and pass model_path=..."
            ) from e
        return cls(model_path, **llama_kwargs)


class ContextWindowExceeded(ValueError):
    """A prompt does not fit the context window (llama_cpp raises ValueError likewise)."""


_GENERATE = inspect.signature(llama_cpp.Llama.generate)
_COMPLETION = inspect.signature(llama_cpp.Llama.create_completion)


def _first(inner: Iterator[int], llm: Llama, sampler: Any) -> int:
    """The first token of llama_cpp's generate, sampled by `sampler` if given (a generation
    that goes on after a context shift), not by a fresh one. Without one it reads a prompt,
    even one token of it (a prefix hit re-reads the prompt's last token alone)."""
    if sampler is None:
        llm._reading_prompt = True
        try:
            return next(inner)
        finally:
            llm._reading_prompt = False
    llm._init_sampler = lambda *args, **kwargs: sampler  # type: ignore[method-assign]
    try:
        return next(inner)
    finally:
        del llm._init_sampler


def _free_sampler(sampler: llama_cpp._internals.LlamaSampler | None) -> None:
    """Free a llama_cpp sampler now: its chain and exit stack refer to each other, and so do a
    custom sampler (logits processors, logit_bias) and its callback's closure; both cycles
    hold the C chain and per-token ctypes objects until a full collection."""
    if sampler is None:
        return
    customs = [custom for _, custom in sampler.custom_samplers]
    sampler.close()  # frees the C chain and empties the exit stack
    for custom in customs:
        custom.__dict__.clear()  # what the callback's closure (via self) kept alive


def ggml_type_name(t: int) -> str:
    """'q8_0' for llama_cpp.GGML_TYPE_Q8_0: the name llama.cpp's -ctk/-ctv take."""
    for name, value in vars(llama_cpp).items():
        if name.startswith("GGML_TYPE_") and name != "GGML_TYPE_COUNT" and value == t:
            return name.removeprefix("GGML_TYPE_").lower()
    return "not a ggml type"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def _without_oldest_turn(messages: list[Any]) -> list[Any] | None:
    """The messages without their oldest turn (up to the next user message); system
    messages stay. None when only the last turn is left."""
    first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), None)
    if first is None:
        return None
    rest = next((i for i in range(first + 1, len(messages))
                 if messages[i].get("role") == "user"), None)
    if rest is None:
        return None
    return messages[:first] + messages[rest:]


def _check_count(name: str, value: object, optional: bool = True) -> None:
    """A knob that counts tokens or bytes is an integer, or None (its default) if optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")


def _layer_budget(slot_f16: int, n_layer: int, tokens: int | None, total_bytes: int | None,
                  n_ctx: int) -> int:
    """K+V bytes per layer from kv_budget (f16 tokens, default n_ctx) or kv_budget_bytes."""
    if tokens is not None and total_bytes is not None:
        raise ValueError("give kv_budget (tokens) or kv_budget_bytes, not both")
    if total_bytes is not None:
        if total_bytes <= 0:
            raise ValueError(f"kv_budget_bytes must be positive, got {total_bytes}")
        return total_bytes // n_layer
    tokens = n_ctx if tokens is None else tokens
    if tokens <= 0:
        raise ValueError(f"kv_budget must be a positive number of tokens, got {tokens}")
    return tokens * slot_f16


SPILL_KINDS = ("host", "disk")


def check_spill(kind: str | None, total_bytes: int | None,
                directory: str | os.PathLike[str] | None) -> str | None:
    """Validate kv_spill, kv_spill_bytes and kv_spill_dir; the directory of a spill to disk."""
    if kind is not None and kind not in SPILL_KINDS:
        raise ValueError(f"unknown kv_spill {kind!r}: choose 'host', 'disk' or None (evict)")
    if total_bytes is not None and (kind is None or total_bytes <= 0):
        raise ValueError(f"kv_spill_bytes={total_bytes!r} needs kv_spill='host' or 'disk' and a "
                         "positive number of bytes")
    if directory is not None and kind != "disk":
        raise ValueError("kv_spill_dir is for kv_spill='disk'")
    if kind != "disk":
        return None
    d = os.fspath(directory) if directory is not None else tempfile.gettempdir()
    if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"kv_spill_dir {d!r} is not a writable directory")
    return d


def spill_slots(kind: str | None, total_bytes: int | None, shape: ModelShape, quant: str,
                n_ctx: int) -> int:
    """Spilled slots per layer: kv_spill_bytes' worth, else every position of the window
    (n_ctx); quant is a checked kv_quant."""
    if kind is None:
        return 0
    slot = quant_slot_bytes(quant, shape.head_dim * shape.n_head_kv)
    if total_bytes is None:
        return n_ctx
    cap = total_bytes // (shape.n_layer * slot)
    if cap < 1:
        raise ValueError(f"kv_spill_bytes={total_bytes} holds no token: one spilled token costs "
                         f"{shape.n_layer * slot} bytes over {shape.n_layer} layers")
    return min(cap, n_ctx)
