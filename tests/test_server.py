"""arkv-server as a user runs it: the real server in a subprocess on a free localhost port,
spoken to with the official `openai` package, stopped at the end (nothing left running)."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp.server.app", reason="needs the server extra (fastapi, ...)")

import arkv_local  # noqa: E402

BUDGET = 256  # tokens: a few chat turns overflow it
START_TIMEOUT = 180  # seconds: imports and the model's load on a busy 2-core machine
ANSWER = dict(max_tokens=12, temperature=0.0, seed=0)


def server_env() -> dict[str, str]:
    """The environment that makes the server import the arkv_local these tests import."""
    package_root = str(Path(arkv_local.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m arkv_local.server ARGS`, run to its end."""
    return subprocess.run([sys.executable, "-m", "arkv_local.server", *args], cwd=cwd,
                          env=server_env(), capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running arkv-server and the lines it printed (read on a thread: the pipe never
    fills, and start-up is awaited on its own words, not by sleeping)."""

    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)  # the process closed its output: it is ending

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"arkv-server not up after {timeout}s:\n{self.log()}")
            if line is None:
                pytest.fail(f"arkv-server ended (rc {self.proc.wait()}):\n{self.log()}")
            if "Uvicorn running on" in line:
                return

    def stop(self) -> int:
        """SIGTERM (uvicorn shuts down cleanly), SIGKILL if it does not; the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)

    def log(self) -> str:
        return "".join(self.lines[-40:])

    def get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST raw bytes as JSON; the status and the decoded answer, errors included."""
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Server]:
    """arkv-server on the default model (no --model), kv_policy arkv, a 256-token budget."""
    port = free_port()
    cmd = [sys.executable, "-m", "arkv_local.server", "--host", "127.0.0.1",
           "--port", str(port), "--kv_policy", "arkv", "--kv_budget", str(BUDGET),
           "--verbose", "false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path_factory.mktemp("server"), env=server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv = Server(proc, f"http://127.0.0.1:{port}")
    try:
        srv.wait_until_up(START_TIMEOUT)
        yield srv
    finally:
        srv.stop()
    assert proc.poll() is not None, "the server is still running"


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def ask(client: Any, question: str) -> str:
    """One chat turn's answer (greedy)."""
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": question}], **ANSWER)
    return reply.choices[0].message.content


def test_two_concurrent_requests_are_served_whole(client: Any) -> None:
    """Two chats at once: each gets the answer it gets alone (greedy; the server serves them
    one after the other). First in the file: the cache holds nothing that a long chat left
    quantized for the next prompt to reuse."""
    questions = ["What is the capital of France?", "Name a color of the sky."]
    alone = [ask(client, q) for q in questions]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda q: ask(client, q), questions))
    assert together == alone
    assert all(alone) and alone[0] != alone[1]


def test_completion(client: Any) -> None:
    reply = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      **ANSWER)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat(client: Any) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], stream=True,
        **ANSWER)
    pieces, reasons = [], []
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces).strip()
    assert len([p for p in pieces if p]) > 1  # streamed, not one block
    assert reasons[-1] in ("stop", "length")


def test_chat_longer_than_the_budget(client: Any, server: Server) -> None:
    """Several turns whose history is well past the 256-token budget: every turn answers, the
    KV bytes (header and /v1/kv) stay within the budget, and tokens were quantized or
    evicted to keep them there."""
    facts = ["The river Seine flows through Paris and into the English Channel at Le Havre.",
             "Mount Everest, on the border of Nepal and China, is the highest mountain.",
             "The Pacific is the largest and deepest of the oceans of the Earth.",
             "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
             "The Great Wall of China was built over many centuries by several dynasties."]
    messages: list[dict[str, str]] = []
    for fact in facts:
        messages.append({"role": "user", "content": f"{fact} {fact} {fact} Say it in other words."})
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0.0, seed=0)
        reply = raw.parse()
        answer = reply.choices[0].message.content
        assert answer.strip()
        assert int(raw.headers["x-kv-bytes-used"]) <= int(raw.headers["x-kv-bytes-budget"])
        messages.append({"role": "assistant", "content": answer})
    assert reply.usage.prompt_tokens > 1.5 * BUDGET
    kv = server.get_json("/v1/kv")
    assert kv["kv_policy"] == "arkv"
    assert kv["n_tokens"] > 1.5 * BUDGET
    assert 0 < kv["bytes_used"] <= kv["bytes_budget"] < kv["bytes_f16"]
    assert any(layer["n_q"] + layer["n_e"] > 0 for layer in kv["layers"])


def test_kv_endpoint(server: Server) -> None:
    """kv_stats() as JSON: the budget is the 256 f16 tokens asked for, and holds."""
    kv = server.get_json("/v1/kv")
    f16_token_bytes = kv["bytes_f16"] // kv["n_tokens"]  # all layers, as an f16 cache
    assert kv["bytes_budget"] == BUDGET * f16_token_bytes
    assert 0 < kv["bytes_used"] <= kv["bytes_budget"]
    assert kv["layers"] and {"n_o", "n_q", "n_e", "oq_ratio", "bytes_used"} <= set(kv["layers"][0])


def test_bad_bodies_are_4xx_and_the_server_stays_up(client: Any, server: Server) -> None:
    for body, says in [(b"{not json", "not valid JSON"), (b"", "empty"),
                       (b'{"messages": "hello"}', "messages"),
                       (b'{"messages": [{"role": "user", "content": "hi"}], '
                        b'"max_tokens": "many"}', "max_tokens")]:
        status, answer = server.post("/v1/chat/completions", body)
        assert status == 400, (body, answer)
        assert says in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smollm2", temperature="warm",
                                       messages=[{"role": "user", "content": "hi"}])
    assert ask(client, "What is 2 + 2?")  # still serving


def test_a_prompt_past_the_trained_context_is_refused(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192") as e:
        client.completions.create(model="smollm2", prompt="hello world " * 5000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("args, says", [
    (["--kv_policy", "nope"], "unknown --kv_policy 'nope'"),
    (["--kv_budget", "10"], "below the window"),
    (["--kv_policy", "full", "--kv_budget", "512"], "needs a kv_policy"),
])
def test_bad_command_line_exits_2_before_loading(args: list[str], says: str,
                                                 tmp_path: Path, smollm2: Path) -> None:
    done = run_cli("--model", str(smollm2), *args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "llama_model_load" not in done.stderr + done.stdout


def test_every_kv_knob_of_llama_is_a_flag() -> None:
    """Llama's kv_* / arkv_* arguments are settings (so flags and config keys), given ones
    pass through (lists as tuples), and under a policy with no n_ctx the window is the
    trained length in a budget of llama_cpp.server's n_ctx."""
    import inspect

    from arkv_local.server import ArkvModelSettings, llama_kwargs

    knobs = {name for name in inspect.signature(arkv_local.Llama.__init__).parameters
             if name.startswith(("kv_", "arkv_"))}
    assert knobs >= {"kv_policy", "kv_budget", "kv_budget_bytes", "arkv_tau"}
    assert knobs <= set(ArkvModelSettings.model_fields)
    stock = {"n_ctx": 2048, "logits_all": True, "verbose": False}
    settings = ArkvModelSettings(model="m.gguf", kv_window=16, arkv_tau=[0.1, 0.2, 0.3],
                                 kv_quant="None")
    assert llama_kwargs(settings, stock) == {
        "kv_policy": "arkv", "kv_window": 16, "arkv_tau": (0.1, 0.2, 0.3), "kv_quant": None,
        "kv_budget": 2048, "logits_all": False, "verbose": False}
    settings = ArkvModelSettings(model="m.gguf", kv_policy="full")
    assert llama_kwargs(settings, stock) == {**stock, "kv_policy": "full"}
    settings = ArkvModelSettings(model="m.gguf", n_ctx=4096, kv_budget=512)
    assert llama_kwargs(settings, {**stock, "n_ctx": 4096}) == {
        **stock, "n_ctx": 4096, "kv_policy": "arkv", "kv_budget": 512}


def test_the_kv_endpoint_reports_the_model_loaded_and_loads_none(
        tmp_path: Path, smollm2: Path) -> None:
    # with two models in a config file, /v1/kv called the proxy without a name, which closed
    # the model just used and loaded the default one: stats of the wrong model, and a reload
    config = {"host": "127.0.0.1", "port": free_port(), "models": [
        {"model": str(smollm2), "model_alias": "a", "kv_policy": "window", "kv_budget": 256,
         "verbose": False},
        {"model": str(smollm2), "model_alias": "b", "kv_policy": "arkv", "kv_budget": 256,
         "verbose": False}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "arkv_local.server", "--config_file",
                             str(tmp_path / "config.json")], cwd=tmp_path, env=server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv = Server(proc, f"http://127.0.0.1:{config['port']}")
    try:
        srv.wait_until_up(START_TIMEOUT)
        body = {"model": "b", "prompt": "The capital of France is", "max_tokens": 2}
        status, _ = srv.post("/v1/completions", json.dumps(body).encode())
        assert status == 200
        kv = srv.get_json("/v1/kv")
        assert kv["kv_policy"] == "arkv" and kv["n_tokens"] > 0  # b, as it was left
    finally:
        srv.stop()
