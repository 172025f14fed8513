"""A chat's turns as the tokens that follow what the KV cache holds.

Each new turn is rendered by the model's chat template around a placeholder for the history
and only that text is tokenized (llama.cpp's CLI formats the new message alone the same way),
so turn 500 costs what turn 5 cost, in time and in memory; an OpenAI-style client that sends
the whole history each time (`create_chat_completion`) renders and tokenizes all of it.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Generator
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .llama import ContextWindowExceeded, Llama

Message = dict[str, str]


class Turns:
    """The turns of one conversation with `llm`: a prompt for each new turn, its answer
    streamed as text. The cache then holds the answer's tokens as they were sampled."""

    MARK = "\x00answer\x00"  # stands for the history when a new turn is rendered

    def __init__(self, llm: Llama) -> None:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{llm.model_path} has no chat template (tokenizer.chat_template)")
        model = llm._model
        self.llm = llm
        self.format = Jinja2ChatFormatter(template, model.token_get_text(llm.token_eos()),
                                          model.token_get_text(llm.token_bos()))
        self.pending: int | None = None  # the answer's last sampled token, not read yet
        self.continues = False  # the cache holds the conversation up to `pending`
        self.n_answer = 0  # tokens of the last answer, its end-of-generation token left out

    def forget(self) -> None:
        """The cache no longer holds this conversation (a reset, a loaded state): the next
        prompt is the whole conversation, matched against the cache by llama_cpp."""
        self.pending, self.continues = None, False

    def prompt(self, messages: list[Message]) -> list[int]:
        """The tokens to generate the answer to messages[-1] from: the cache's tokens and the
        new turn's when the cache holds the conversation so far, else all of it."""
        llm = self.llm
        if self.continues:
            system = [m for m in messages[:1] if m.get("role") == "system"]
            past = [{"role": "user", "content": "-"}, {"role": "assistant", "content": self.MARK}]
            text = self.format(messages=[*system, *past, messages[-1]]).prompt
            at = text.find(self.MARK)
            if at >= 0:
                new = llm.tokenize(text[at + len(self.MARK):].encode(), add_bos=False,
                                   special=True)
                last = [] if self.pending is None or self._is_eog(self.pending) else [self.pending]
                return llm.input_ids[: llm.n_tokens].tolist() + last + new
        result = self.format(messages=messages)
        return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special,
                            special=True)

    def answer(self, prompt: list[int], max_tokens: int, seed: int | None = None,
               **sampling: Any) -> Generator[str, None, None]:
        """The answer to `prompt` streamed as text, at most max_tokens tokens, ending at an
        end-of-generation token; `sampling` as llama_cpp.Llama.generate takes it. A prompt
        the window cannot take raises ContextWindowExceeded here, before anything is read.
        Closing the stream stops the answer; the cache keeps what was said."""
        llm = self.llm
        if llm.kv_policy == "full":  # llama_cpp's window, as its create_completion has it
            if len(prompt) >= llm.n_ctx():
                raise ContextWindowExceeded(f"Requested tokens ({len(prompt)}) exceed context "
                                            f"window of {llm.n_ctx()}")
            max_tokens = min(max_tokens, llm.n_ctx() - len(prompt))
        # each answer seeded as create_completion seeds each completion
        llm.set_seed(seed if seed is not None else random.Random(llm._seed).randint(0, 2**32))
        self.forget()
        self.n_answer = 0
        return self._stream(llm.generate(prompt, reset=True, **sampling), max_tokens)

    def _stream(self, tokens: Generator[int, Any, None],
                max_tokens: int) -> Generator[str, None, None]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        try:
            for _ in range(max_tokens):
                self.continues = False  # until the next token: an error (Ctrl-C) in the
                token = next(tokens, None)  # eval of the last one leaves the cache's end unknown
                if token is None:
                    break
                self.pending, self.continues = token, True
                if self._is_eog(token):
                    break
                self.n_answer += 1
                piece = decoder.decode(self.llm.detokenize([token]))
                if piece:
                    yield piece
        finally:
            tokens.close()

    def _is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))
