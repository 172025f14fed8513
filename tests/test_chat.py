"""arkv-chat as a person uses it: in a pseudo-terminal, one-shot, and with piped input."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pexpect
import pytest

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
