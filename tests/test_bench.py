"""`python -m arkv_local.bench run --quick`: exits 0, prints its table, writes plots and docs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

QUICK_CONFIGS = ["full", "q4_0", "window@25%", "arkv@25%"]


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of the fidelity table (the one with a 'mean KLD' column), by config name."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "| mean KLD |" in line)
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    rows["_header"] = header
    return rows


def test_quick_run(tmp_path: Path) -> None:
    """The quick suite runs end to end; its numbers are sane and its files are written."""
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "arkv_local.bench", "run", "--quick",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = table_rows(p.stdout)
    col = {name: i for i, name in enumerate(rows.pop("_header"))}
    assert set(QUICK_CONFIGS) <= set(rows), rows.keys()
    for name in QUICK_CONFIGS:
        assert math.isfinite(float(rows[name][col["mean KLD"]])), rows[name]
    assert float(rows["full"][col["mean KLD"]]) == 0.0
    assert rows["full"][col["same top-1"]] == "100.0%"
    arkv = rows["arkv@25%"]
    assert float(arkv[col["KV MiB"]]) <= float(arkv[col["budget MiB"]])
    # every token of the text is in one state in every layer: O, Q, spilled or evicted
    layers = p.stdout.split("per layer (tokens per KV head, O/Q/S/E): ")[1].splitlines()[0]
    counts = [[int(c) for c in layer.split()[1].split("/")] for layer in layers.split(", ")]
    assert len(counts) == 30 and all(sum(c) == 400 for c in counts), counts
    assert any(c[2] > 0 for c in counts)  # the default spill holds rows
    for name in ("BENCHMARKS.md", "kld_vs_memory.png", "arkv_layers.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "kld_vs_memory.png").read_bytes()[:4] == b"\x89PNG"


def test_plots_are_skipped_with_a_hint_without_matplotlib(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from arkv_local.bench import suite

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "arkv_local.bench.plots", raising=False)
    rep = suite.Report(tmp_path / "BENCHMARKS.md")
    rep.add("# Benchmarks")
    suite.plots(rep, {"full": {}, "arkv@25%": {"layers": []}}, 400, tmp_path)
    out = capsys.readouterr()
    assert out.err == ("arkv_local.bench: plots skipped: matplotlib is not installed "
                       "(pip install 'arkv_local[plot]')\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]
    assert (tmp_path / "BENCHMARKS.md").read_text() == "# Benchmarks\n"


def test_soak_runs_past_the_window_in_flat_kv_memory() -> None:
    """`bench soak`: a chat several windows long, answers of max_tokens each (end of text never
    sampled), context shifts counted, KV bytes within the budget at every turn."""
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "arkv_local.bench", "soak", "--n-ctx", "512",
                        "--kv-budget", "128", "--tokens", "1200", "--max-tokens", "128",
                        "--ignore-eos", "--every", "1"], cwd=root, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    header = lines[1].split()
    assert header[:4] == ["turn", "answer", "tok", "seen"], header
    rows = [[float(x) for x in line.split()] for line in lines[2:] if line[:5].strip().isdigit()]
    assert len(rows) == 10  # 1200 tokens in answers of exactly 128
    assert [r[1] for r in rows] == [128.0 * (i + 1) for i in range(10)]
    assert rows[-1][3] >= 3  # shifts: 1280 answer tokens in a window of 512
    budget_mib = 128 * 30 * 2 * 3 * 64 * 2 / 2**20  # f16 tokens x layers x K,V x heads x dim x 2 B
    assert all(0 < r[5] <= budget_mib for r in rows)
    assert "after the first 1000 tokens" in lines[-1]


def test_speed_keeps_the_best_prefill_and_the_plans_of_the_best_decode() -> None:
    from arkv_local.bench.suite import best_speed

    slow_decode = dict(prefill=120.0, decode=20.0, decode_plans=3, decode_plan_seconds=0.6)
    fast_decode = dict(prefill=100.0, decode=30.0, decode_plans=2, decode_plan_seconds=0.2)
    for runs in ([slow_decode, fast_decode], [fast_decode, slow_decode]):
        best = None
        for r in runs:
            best = best_speed(best, r)
        assert best == dict(prefill=120.0, decode=30.0, decode_plans=2, decode_plan_seconds=0.2)


def test_two_keys_are_counted_over_the_prompts_full_answers() -> None:
    from arkv_local.bench.suite import depth_label, two_key_finds

    def trial(length: int, depth: float | list[float], ok: bool) -> dict[str, object]:
        return {"length": length, "depth": depth, "ok": ok}

    pk = {"full": {"trials": [trial(1024, 0.5, True), trial(1024, [0.25, 0.75], True),
                              trial(1024, [0.1, 0.6], False), trial(2048, [0.25, 0.75], True)]},
          "arkv@25%": {"trials": [trial(1024, 0.5, False), trial(1024, [0.25, 0.75], False),
                                  trial(1024, [0.1, 0.6], True),
                                  trial(2048, [0.25, 0.75], True)]}}
    assert two_key_finds(pk, "arkv@25%") == (1, 2)  # the pair full misses is not counted
    assert two_key_finds(pk, "full") == (2, 2)
    assert [depth_label(d) for d in (0.1, [0.25, 0.75])] == ["10%", "two@25+75%"]


def test_the_layer_plot_stacks_every_state() -> None:
    from arkv_local.bench.plots import layer_stack
    from arkv_local.tailoring import LayerKVStats

    layers = [LayerKVStats(n_o=5, n_q=10, n_e=3, oq_ratio=0.5, bytes_used=0, n_s=7)]
    stack = layer_stack(layers)
    assert [label for label, _, _ in stack] == ["O (f16)", "Q (4-bit)", "S (spilled)",
                                                "E (evicted)"]
    assert [counts for _, _, counts in stack] == [[5], [10], [7], [3]]


def test_speed_runs_use_flash_attention_as_asked() -> None:
    # `run --speed-flash-attn off` measures llama-cpp-python's default; the other tasks keep it on
    import llama_cpp

    from arkv_local.bench.child import open_config
    from arkv_local.tiny_models import tiny_model_path

    path = str(tiny_model_path("llama", n_embd=128, n_head=2, n_head_kv=2))
    on, off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    for cfg, want in (({"kind": "arkv"}, on), ({"kind": "arkv", "flash_attn": False}, off),
                      ({"kind": "f16", "flash_attn": False}, off)):
        llm = open_config(cfg, path, n_ctx=256, budget_tokens=128)
        assert llm.context_params.flash_attn_type == want, cfg
        llm.close()


def test_a_passkey_haystack_is_a_window_of_the_text_with_the_needles_at_their_depths(
        smollm2: Path) -> None:
    # `run --passkey-text FILE`: keys hidden in a real text, not in repeated filler sentences
    import numpy as np

    from arkv_local import Llama
    from arkv_local.bench.child import FILLER, passkey_prompt

    llm = Llama(str(smollm2), vocab_only=True, verbose=False)
    words = [f"w{i}" for i in range(6000)]
    needles = [(0.75, "The second key is 2. "), (0.25, "The first key is 1. ")]
    prompt = passkey_prompt(llm, 1000, needles, "Which keys?", " ".join(words),
                            np.random.default_rng(3))
    head, body = prompt.split("remember it. ", 1)
    body, question = body.rsplit("\n", 1)
    assert question == "Which keys?"
    got = body.split()
    at = [got.index("first"), got.index("second")]
    window = [w for w in got if w.startswith("w") and w[1:].isdigit()]
    start = int(window[0][1:])
    assert window == words[start:start + len(window)]  # one window, in order, nothing left out
    n = len(llm.tokenize(body.encode(), add_bos=False))
    assert 900 <= n <= 1100, n
    # each needle sits at its depth of the window's words ("The" before "first"; the second
    # needle after the first's 5 words)
    assert (at[0] - 1, at[1] - 1 - 5) == (int(0.25 * len(window)), int(0.75 * len(window)))
    with pytest.raises(ValueError, match="fewer than"):
        passkey_prompt(llm, 1000, needles, "?", " ".join(words[:100]))
    # without a haystack: the repeated filler sentences, as before
    reps = 1000 // len(llm.tokenize(FILLER.encode(), add_bos=False))
    cut = int(reps * 0.5)
    assert passkey_prompt(llm, 1000, [(0.5, "K. ")], "?") == (
        "There is a pass key hidden in the following text. Find it and remember it. "
        + FILLER * cut + "K. " + FILLER * (reps - cut) + "\n?")
    llm.close()


def test_a_missing_passkey_text_is_refused_by_name(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    p = subprocess.run([sys.executable, "-m", "arkv_local.bench", "run", "--passkey-text",
                        missing, "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 2 and "--passkey-text: no such file" in p.stderr and missing in p.stderr
