"""arkv-chat as a person uses it: in a pseudo-terminal, one-shot, and with piped input."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pexpect
import pytest
from llama_cpp import LogitsProcessorList

from arkv_local.chat import Chat, load_model, parse_args
from arkv_local.models import model_shape

REPO = Path(__file__).resolve().parent.parent
CHAT = [sys.executable, "-m", "arkv_local.chat"]
SMALL = ["--policy", "arkv", "--kv-budget", "256", "--max-tokens", "24", "--ctx", "2048"]
STATUS = (r"\[KV [\d.]+ MiB of [\d.]+ MiB(; [\d.]+ MiB spilled to host)?; f16 would need "
          r"[\d.]+ MiB \| \d+ tokens")


@pytest.fixture
def chat(smollm2: Path) -> pexpect.spawn:
    child = pexpect.spawn(CHAT[0], CHAT[1:] + SMALL, cwd=REPO, encoding="utf-8", timeout=180,
                          dimensions=(40, 200))
    child.expect("/help for commands")
    child.expect("> ")
    yield child
    child.close(force=True)


def ask(child: pexpect.spawn, line: str) -> str:
    """Send a line, return what came back before the next prompt."""
    child.sendline(line)
    child.expect("\r\n> ")
    return child.before


def test_a_conversation_in_a_terminal(chat: pexpect.spawn, tmp_path: Path) -> None:
    out = ask(chat, "What is the capital of France?")
    answer, _, status = out.partition("[KV ")
    assert answer.replace("What is the capital of France?", "").strip()  # streamed text
    assert re.search(STATUS, "[KV " + status)

    # a long message: read with a progress bar, then the cache is tailored to its budget
    out = ask(chat, "Summarize this: " + "The quick brown fox jumps over the lazy dog. " * 60)
    assert "reading prompt" in out
    s_e = re.search(r" S (\d+) E (\d+) \|", out)  # spilled to host memory, or evicted
    assert int(s_e.group(1)) + int(s_e.group(2)) > 0

    table = ask(chat, "/stats")
    assert "O (f16)" in table and "Q (4-bit)" in table and "tailorings" in table
    assert len([row for row in table.splitlines() if row.strip()[:2].strip().isdigit()]) >= 30

    assert "unknown command /frobnicate" in ask(chat, "/frobnicate")
    state = tmp_path / "chat.state"
    assert "saved 4 messages" in ask(chat, f"/save {state}")
    assert "conversation cleared" in ask(chat, "/reset")
    assert "loaded 4 messages" in ask(chat, f"/load {state}")
    assert "no such file" in ask(chat, f"/load {tmp_path / 'missing'}")
    picture = tmp_path / "kv.png"
    assert "plot saved" in ask(chat, f"/plot {picture}")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "/reset" in ask(chat, "/help")

    # Ctrl-C stops an answer, not the chat
    chat.sendline("Write a very long story about a dragon and a knight.")
    chat.expect("knight.\r\n")  # the terminal's echo of the line
    chat.expect(r"\w+")  # the answer is streaming
    chat.sendintr()
    chat.expect("\r\n> ")
    assert chat.isalive()
    assert re.search(STATUS, ask(chat, "Thanks!"))

    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.wait()
    assert chat.exitstatus == 0


def test_one_shot_prints_only_the_answer(smollm2: Path) -> None:
    run = subprocess.run(CHAT + SMALL + ["--prompt", "Say hello in French."], cwd=REPO,
                         capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "[KV" not in run.stdout and "> " not in run.stdout


def test_one_shot_past_the_window_fails_on_stderr(smollm2: Path) -> None:
    run = subprocess.run(CHAT + ["--model", str(smollm2), "--policy", "full", "--ctx", "256",
                                 "--prompt", "Summarize: " + "The quick brown fox. " * 80],
                         cwd=REPO, capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 1 and not run.stdout.strip()
    assert "exceed context window of 256" in run.stderr


def test_save_and_plot_to_a_path_that_cannot_be_written_say_so(quiet_chat: Chat,
                                                                tmp_path: Path) -> None:
    # they raised out of the chat, which ended with a traceback: the conversation was lost
    chat = quiet_chat
    chat.answer("Name a color.", False)
    missing = tmp_path / "no" / "such" / "dir" / "talk.arkv"
    assert f"cannot save to {missing}: No such file or directory" in said(chat, f"/save {missing}")
    assert f"cannot save to {tmp_path}: Is a directory" in said(chat, f"/save {tmp_path}")
    assert not missing.exists() and len(chat.messages) == 2
    pytest.importorskip("matplotlib")
    assert f"cannot plot to {missing}" in said(chat, f"/plot {missing}")
    assert f"cannot plot to {tmp_path / 'x.nope'}" in said(chat, f"/plot {tmp_path / 'x.nope'}")
    chat.answer("Name a fruit.", False)
    assert len(chat.messages) == 4


def test_piped_input_answers_each_line(smollm2: Path) -> None:
    run = subprocess.run(CHAT + SMALL, cwd=REPO, capture_output=True, text=True, timeout=180,
                         input="Name a color.\n/stats\nName a fruit.\n")
    assert run.returncode == 0, run.stderr
    assert "O (f16)" in run.stdout and "[KV" not in run.stdout
    before, _, after = run.stdout.partition("layer")
    assert before.strip() and after.split("tailorings")[-1].strip()  # two answers


def test_a_model_that_cannot_be_served_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a model")
    run = subprocess.run(CHAT + ["--model", str(bogus)], cwd=REPO, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"arkv-chat: {bogus} is not a GGUF file (it starts with b'not ', not b'GGUF'): llama.cpp "
        "loads only GGUF models; convert others with llama.cpp's convert_hf_to_gguf.py"]


@pytest.fixture
def quiet_chat(smollm2: Path) -> Chat:
    """A chat in this process: answers go to a string."""
    args = parse_args(SMALL + ["--seed", "0", "--temperature", "0"])
    return Chat(load_model(args), args, out=io.StringIO())


def said(chat: Chat, line: str) -> str:
    chat.out.seek(0)
    chat.out.truncate()
    chat.command(line)
    return chat.out.getvalue()


def test_save_then_load_round_trips(quiet_chat: Chat, tmp_path: Path) -> None:
    chat = quiet_chat
    chat.answer("Summarize: " + "The quick brown fox jumps over the lazy dog. " * 30, False)
    chat.answer("And in French?", False)
    llm = chat.llm
    messages, stats = list(chat.messages), llm.kv_stats()
    session, ids = llm._tailor.session.snapshot(), llm.input_ids[: llm.n_tokens].tolist()
    assert stats.n_tailorings > 0
    path = tmp_path / "talk.arkv"
    assert "saved 4 messages" in said(chat, f"/save {path}")
    assert zipfile.is_zipfile(path)  # data: JSON and raw bytes, no pickle
    said(chat, "/reset")
    chat.answer("Something else: name a cat.", False)
    assert "loaded 4 messages" in said(chat, f"/load {path}")
    assert chat.messages == messages and llm.kv_stats() == stats
    assert llm._tailor.session.snapshot() == session
    assert llm.input_ids[: llm.n_tokens].tolist() == ids


def test_ctrl_c_before_the_answer_streams_stops_that_answer_not_the_chat(
        quiet_chat: Chat, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C lands anywhere after a line was read (CI saw it at answer()'s first line)."""
    chat, real = quiet_chat, Chat.stream
    calls: list[str] = []

    def interrupted_once(self: Chat, user: str):
        calls.append(user)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the signal arrived before streaming began
        return real(self, user)

    monkeypatch.setattr(Chat, "stream", interrupted_once)
    chat.run(io.StringIO("First question?\n/help\nSecond question?\n"), interactive=False)
    out = chat.out.getvalue()
    assert calls == ["First question?", "Second question?"]
    assert "[stopped]" in out and "/reset" in out  # the chat went on to the next lines
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[0]["content"] == "Second question?" and chat.messages[1]["content"]


class Boom:
    """What a crafted pickle does on load: here, create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def test_load_refuses_a_pickle_without_running_it(quiet_chat: Chat, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    crafted = tmp_path / "chat.state"
    crafted.write_bytes(pickle.dumps(([{"role": "user", "content": "hi"}], Boom(marker))))
    out = said(quiet_chat, f"/load {crafted}")
    assert not marker.exists()
    assert f"cannot load {crafted}: not an arkv-chat session file" in out
    assert quiet_chat.messages == []
    bogus = tmp_path / "notes.zip"
    with zipfile.ZipFile(bogus, "w") as z:
        z.writestr("readme.txt", "hello")
    assert f"cannot load {bogus}: not an arkv-chat session file" in said(quiet_chat,
                                                                       f"/load {bogus}")


def test_ctx_flag_is_the_window_and_a_policy_runs_to_the_trained_limit_without_it(
        smollm2: Path) -> None:
    shape = model_shape(smollm2)
    per_token, n_train = shape.f16_slot_bytes * shape.n_layer, shape.n_ctx_train
    llm = load_model(parse_args(["--model", str(smollm2)]))  # arkv, no --ctx
    assert llm.n_ctx() == n_train and llm.kv_stats().bytes_budget == 4096 * per_token
    llm = load_model(parse_args(["--model", str(smollm2), "--ctx", "2048"]))
    assert llm.n_ctx() == 2048 and llm.kv_stats().bytes_budget == 2048 * per_token
    llm = load_model(parse_args(["--model", str(smollm2), "--policy", "full"]))
    assert llm.n_ctx() == 4096


def test_each_turn_reads_only_what_is_new_to_the_cache(
        smollm2: Path, decoded: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """arkv-chat's turns: llama.cpp decodes the last answer's pending token, the template's
    text between turns and the answer, nothing of the history, past context shifts too, and
    only the new turn's text is tokenized; the cache's text is the chat template's
    conversation, answers as sampled."""
    args = parse_args(["--model", str(smollm2), "--policy", "arkv", "--kv-budget", "128",
                       "--ctx", "256", "--max-tokens", "48", "--system",
                       "You are a helpful assistant."])
    chat = Chat(load_model(args), args, out=io.StringIO())
    llm, turns = chat.llm, chat.turns
    eos = llm.token_eos()
    users = [f"Tell me one more thing about {t}." for t in ("rivers", "bread", "owls", "maps")]
    n_head = len(llm.tokenize(b"<|im_end|>\n<|im_start|>user\n", add_bos=False, special=True))
    tokenized: list[int] = []
    tokenize = llm.tokenize
    monkeypatch.setattr(llm, "tokenize", lambda text, *a, **k: tokenized.append(len(text))
                        or tokenize(text, *a, **k))
    for i, user in enumerate(users):
        decoded.clear()
        tokenized.clear()
        messages = [*chat.messages, {"role": "user", "content": user}]
        prompt = turns.prompt(messages)
        biased = LogitsProcessorList([lambda _, logits: _no_eos(logits, eos)])
        answer = "".join(turns.answer(prompt, 48, seed=i, logits_processor=biased))
        chat.messages = [*messages, {"role": "assistant", "content": answer}]
        assert turns.n_answer == 48 and turns.continues
        if i > 0:  # the text between the last answer and this one, nothing of the history
            assert tokenized == [len(f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                                     "<|im_start|>assistant\n")]
        n_turn = len(llm.tokenize(f"{user}<|im_end|>\n<|im_start|>assistant\n".encode(),
                                  add_bos=False, special=True))
        if i > 0:  # the last answer token, "<|im_end|>\n<|im_start|>user\n", the turn, answer
            assert sum(decoded) == 1 + n_head + n_turn + 47, decoded
    assert llm.kv_stats().n_shifts >= 1
    sinks, dropped = llm._tailor.policy.sinks, list(llm._tailor.session.dropped)
    held = llm.input_ids[: llm.n_tokens].tolist()
    text = llm.detokenize(held[:sinks] + dropped + held[sinks:], special=True).decode()
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}"
    at = [text.index(turn.format(u, m["content"][:20]))
          for u, m in zip(users, chat.messages[2::2], strict=True)]
    assert at == sorted(at)


def _no_eos(logits: np.ndarray, eos: int) -> np.ndarray:
    logits[eos] = -np.inf
    return logits


@pytest.mark.parametrize("policy", ["full", "arkv"])
def test_a_turn_answers_as_create_chat_completion_does(smollm2: Path, policy: str) -> None:
    """The first turn's prompt and sampling are llama_cpp's chat handler's: the same greedy
    answer; after /reset, and after a Ctrl-C mid-answer, the next turn is read right."""
    args = parse_args(["--model", str(smollm2), "--policy", policy, "--ctx", "1024",
                       "--max-tokens", "24", "--temperature", "0"])
    chat = Chat(load_model(args), args, out=io.StringIO())
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = chat.llm.create_chat_completion(question, max_tokens=24, temperature=0)
    chat.reset()
    chat.answer(question[0]["content"], False)
    assert chat.messages[-1]["content"] == expected["choices"][0]["message"]["content"]

    pieces = chat.stream("And of Italy?")  # stopped after two pieces, as by Ctrl-C
    said = next(pieces) + next(pieces)
    pieces.close()
    assert chat.messages[-1] == {"role": "assistant", "content": said}
    chat.answer("Thanks.", False)
    text = chat.llm.detokenize(chat.llm.input_ids[: chat.llm.n_tokens].tolist(), special=True)
    assert (f"And of Italy?<|im_end|>\n<|im_start|>assistant\n{said}<|im_end|>\n"
            f"<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n") in text.decode()


def test_a_turn_past_the_window_of_full_is_refused_and_the_chat_goes_on(smollm2: Path) -> None:
    args = parse_args(["--model", str(smollm2), "--policy", "full", "--ctx", "256",
                       "--max-tokens", "8", "--temperature", "0"])
    chat = Chat(load_model(args), args, out=io.StringIO())
    chat.answer("Hello!", False)
    before = list(chat.messages)
    chat.answer("Summarize: " + "The quick brown fox jumps over the lazy dog. " * 40, False)
    assert "exceed context window of 256: /reset starts a new conversation" in \
        chat.out.getvalue()
    assert chat.messages == before
    chat.answer("Hello again!", False)
    assert len(chat.messages) == len(before) + 2 and chat.messages[-1]["content"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_new_turn_is_the_text_the_template_gives_the_whole_conversation(arch: str) -> None:
    """Llama 3's and ChatML's templates: the cache's tokens and a turn rendered alone read as
    the template's rendering of the whole conversation (answers cut by max_tokens, so each
    ends on a token sampled and not yet read)."""
    from arkv_local import Llama
    from arkv_local.tiny_models import tiny_model_path
    from arkv_local.turns import Turns

    llm = Llama(str(tiny_model_path(arch, head_dim=32)), kv_policy="arkv", kv_budget=128,
                n_ctx=512, verbose=False, seed=0)
    turns = Turns(llm)
    printable = np.array([0 < len(b := llm.detokenize([t])) and all(32 <= c < 127 for c in b)
                          for t in range(llm.n_vocab())])  # random weights: text answers

    def text_only(_: object, logits: np.ndarray) -> np.ndarray:
        logits[~printable] = -np.inf
        return logits

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for turn in range(3):
        answer = "".join(turns.answer(turns.prompt(messages), 12, temp=0,
                                      logits_processor=[text_only]))
        assert turns.n_answer == 12 and answer
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": f"Next {turn}"}]
        prompt = turns.prompt(messages)
        assert prompt[: llm.n_tokens] == llm.input_ids[: llm.n_tokens].tolist()
        assert llm.detokenize(prompt, special=True).decode() == \
            turns.format(messages=messages).prompt


def test_without_a_chat_template_turns_go_through_llama_cpps_handler(smollm2: Path) -> None:
    """A model with no template in its metadata (Turns refuses it): llama_cpp's chat handler,
    the whole history sent each turn, streamed the same way."""
    args = parse_args(["--model", str(smollm2), "--policy", "arkv", "--kv-budget", "256",
                       "--max-tokens", "16", "--temperature", "0"])
    chat = Chat(load_model(args), args, out=io.StringIO())
    chat.turns = None
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = chat.llm.create_chat_completion(question, max_tokens=16, temperature=0)
    chat.reset()
    chat.answer(question[0]["content"], False)
    answer = expected["choices"][0]["message"]["content"]
    assert chat.messages == [*question, {"role": "assistant", "content": answer}]
    assert chat.out.getvalue() == answer + "\n"


def test_max_tokens_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--max-tokens", "0"])
    assert "--max-tokens must be at least 1, got 0" in capsys.readouterr().err
