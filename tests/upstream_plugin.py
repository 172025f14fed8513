"""Pytest plugin: llama-cpp-python's own tests, run against arkv_local.Llama under one KV policy.

tests/test_upstream.py unpacks the pinned sdist's tests/, rewrites with `prepare_suite` the
assertions whose expected value is another model's output (REWRITES), and runs the suite in a
pytest subprocess with `-p upstream_plugin` once per entry of RUNS. Loaded there, this plugin

- makes `llama_cpp.Llama` an arkv_local.Llama with the knobs of run $ARKV_UPSTREAM_RUN,
- makes `huggingface_hub.hf_hub_download` return the default model for the GGUFs the tests
  download (no network), and skips the tests that need another kind of model (SKIPS),
- writes what each test did to $ARKV_UPSTREAM_REPORT (JSON): its outcome, the values of the
  rewritten assertions, and what the policy did to its caches.

A rewritten assertion calls `expect`. Under "full" it records the value: the default model's
answer is the reference, the upstream value being another model's. Under a policy the value must
equal the full run's ($ARKV_UPSTREAM_REFERENCE) when the cache held every token in f16 (then the
tri-state memory must change nothing); a tailored cache may answer otherwise, so there the value
is only recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import arkv_local.llama  # binds llama_cpp to our library: before llama_cpp is imported

# The runs, by name: arkv_local.Llama's KV knobs. "full" is llama.cpp's own cache, the reference.
# "arkv-roomy" holds every token of the suite's short texts in f16: its tri-state memory must
# change nothing. "arkv-tight" has 3 f16 tokens of memory (a 1-token window, 1 sink, 1 slot freed
# per tailoring): the suite's texts (4 to 21 tokens) all overflow it, rows go to the host spill
# and prompts recall them. "arkv-evict" has 6, without a spill: the longer texts keep rows in
# 4 bits and evict others, as the ARKV paper does.
RUNS: dict[str, dict[str, Any]] = {
    "full": dict(kv_policy="full"),
    "arkv-roomy": dict(kv_policy="arkv", kv_budget=256),
    "arkv-tight": dict(kv_policy="arkv", kv_budget=3, kv_window=1, kv_sinks=1, kv_slack=1),
    "arkv-evict": dict(kv_policy="arkv", kv_budget=6, kv_window=1, kv_sinks=1, kv_slack=1,
                       kv_spill=None),
}

# GGUFs the tests fetch from the Hugging Face Hub that the default model stands for: decoder-only
# transformers, as SmolLM2-135M-Instruct (the tests check `_is_recurrent is False`).
DEFAULT_MODEL_FOR = {
    ("lmstudio-community/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q8_0.gguf"),
    ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"),
}

_RECURRENT = ("needs a recurrent model (mamba-130m, from the Hub): the default model is a "
              "transformer, and the tri-state memory holds attention KV only")
_HYBRID = ("needs a hybrid attention/recurrent model (Falcon-H1-Tiny, from the Hub): the default "
           "model is a transformer")
SKIPS: dict[str, str] = {
    "tests/test_llama.py::test_recurrent_model_prompt_cache_reset": _RECURRENT,
    "tests/test_llama.py::test_hybrid_model_prompt_cache_reset": _HYBRID,
    "tests/test_llama.py::test_real_llama_embeddings": (
        "needs a pooled embedding model (bge-small, BERT, from the Hub): with the default model "
        "(causal, no pooling) its batched and single embeddings differ under 'full' too; and "
        "under a policy, embedding=True is refused (README: the tri-state memory serves one "
        "sequence, use 'full' for embeddings)"),
    **{f"tests/test_llama.py::{name}[llama_cpp_{kind}_model_path-{flags}]": reason
       for name in ("test_exact_cached_prompt_reuse_matches_fresh",
                    "test_loaded_exact_cached_prompt_reuse_matches_fresh",
                    "test_ram_cache_exact_prompt_hit_matches_fresh",
                    "test_shorter_prompt_prefix_reuse_matches_fresh")
       for kind, flags, reason in (("recurrent", "True-False", _RECURRENT),
                                   ("hybrid", "False-True", _HYBRID))},
}

# Assertions whose expected value is the output of the model the test downloads, as
# (file, old line, new line): each becomes expect(its Llama or None, value, upstream value).
# Each old line must occur exactly once in the pinned sdist.
REWRITES: list[tuple[str, str, str]] = [
    ("test_llama.py",  # Qwen3.5's tokens for "Hello, world!"
     "    assert tokens == [9419, 11, 1814, 0]\n",
     "    upstream_plugin.expect(None, tokens, [9419, 11, 1814, 0])\n"),
    ("test_llama.py",
     '    assert output["choices"][0]["text"] == " jumps over the lazy dog."\n',
     '    upstream_plugin.expect(model, output["choices"][0]["text"], " jumps over the lazy '
     'dog.")\n'),
    ("test_llama.py",
     '    assert output["choices"][0]["text"] == "true"\n',
     '    upstream_plugin.expect(model, output["choices"][0]["text"], "true")\n'),
    ("test_llama.py",
     '    assert output_1["choices"][0]["text"] == " jumps over the lazy dog."\n',
     '    upstream_plugin.expect(model, output_1["choices"][0]["text"], " jumps over the lazy '
     'dog.")\n'),
]


def prepare_suite(unpacked: Path, dest: Path) -> Path:
    """Copy the unpacked suite (arkv_local._vendor.upstream_tests) to dest with REWRITES applied;
    a line that is not there exactly once is an error (the pin moved: review the table). An
    empty pytest.ini makes dest the rootdir: no configuration from the directories above."""
    shutil.copytree(unpacked, dest)
    (dest / "pytest.ini").write_text("[pytest]\n")
    for name, old, new in REWRITES:
        path = dest / "tests" / name
        text = path.read_text()
        if text.count(old) != 1:
            raise ValueError(f"{name}: expected this line once, found it {text.count(old)} "
                             f"times:\n{old}")
        text = text.replace(old, new)
        if not text.startswith("import upstream_plugin\n"):
            text = "import upstream_plugin\n" + text
        path.write_text(text)
    return dest


@dataclass
class CacheSeen:
    """What the policy did to the caches of one test: the most seen after any eval."""

    evals: int = 0
    tailorings: int = 0
    recalls: int = 0
    positions: int = 0
    q_rows: int = 0  # 4-bit rows, over layers (a row: one token of one KV head)
    s_rows: int = 0  # spilled to host memory
    e_rows: int = 0  # evicted

    def observe(self, llm: arkv_local.Llama) -> None:
        """Take in the cache of llm after an eval (nothing to see under "full")."""
        self.evals += 1
        if llm.kv_policy == "full":
            return
        s = llm.kv_stats()
        self.tailorings = max(self.tailorings, s.n_tailorings)
        self.recalls = max(self.recalls, s.n_recalls)
        self.positions = max(self.positions, s.n_tokens)
        self.q_rows = max(self.q_rows, sum(lv.n_q for lv in s.layers))
        self.s_rows = max(self.s_rows, sum(lv.n_s for lv in s.layers))
        self.e_rows = max(self.e_rows, sum(lv.n_e for lv in s.layers))


@dataclass
class UpstreamTest:
    """One upstream test: outcome ("passed", "failed", "skipped"), why, and what it saw."""

    outcome: str = ""
    reason: str = ""
    expect: list[dict[str, Any]] = field(default_factory=list)
    cache: CacheSeen = field(default_factory=CacheSeen)


class Run:
    """This pytest run: its name and knobs, the full run's values, and a record per test."""

    def __init__(self, name: str, reference: Path | None) -> None:
        if name not in RUNS:
            raise ValueError(f"unknown run {name!r}: one of {sorted(RUNS)}")
        self.name = name
        self.knobs = RUNS[name]
        self.reference: dict[str, Any] = (
            json.loads(reference.read_text())["tests"] if reference else {})
        if self.knobs["kv_policy"] != "full" and not self.reference:
            raise ValueError(f"run {name!r} compares with the full run: set "
                             "ARKV_UPSTREAM_REFERENCE to its report")
        self.tests: dict[str, UpstreamTest] = {}
        self.current: UpstreamTest | None = None
        self.current_id = ""
        self.stand_ins: list[str] = []

    def expect(self, llm: arkv_local.Llama | None, value: Any, upstream: Any) -> None:
        """A rewritten assertion (see the module docstring)."""
        assert self.current is not None, "expect() outside a test"
        value = json.loads(json.dumps(value))
        exact = llm is None or llm.kv_policy == "full" or all(
            lv.n_q == lv.n_s == lv.n_e == 0 for lv in llm.kv_stats().layers)
        i = len(self.current.expect)
        entry: dict[str, Any] = {"value": value, "upstream": upstream, "exact": exact}
        self.current.expect.append(entry)
        if not self.reference:
            return
        ref = self.reference.get(self.current_id, {}).get("expect", [])
        assert i < len(ref), f"{self.current_id}: the full run has no value #{i}"
        entry["full"] = ref[i]["value"]
        if exact:
            assert value == ref[i]["value"], (
                f"{self.current_id}, value #{i}: {value!r} under {self.name!r} with every token "
                f"in f16, {ref[i]['value']!r} under 'full'")

    def report(self) -> dict[str, Any]:
        """What $ARKV_UPSTREAM_REPORT gets: the run, its knobs and every test's record."""
        return {"run": self.name, "knobs": self.knobs, "stand_ins": self.stand_ins,
                "tests": {k: asdict(v) for k, v in self.tests.items()}}


_RUN: Run | None = None


def expect(llm: arkv_local.Llama | None, value: Any, upstream: Any) -> None:
    """What a rewritten upstream assertion calls: record the value, or compare it with full's."""
    assert _RUN is not None, "upstream_plugin is not loaded (-p upstream_plugin)"
    _RUN.expect(llm, value, upstream)


def run_llama(knobs: dict[str, Any]) -> type[arkv_local.Llama]:
    """arkv_local.Llama with these knobs (the test's own arguments win) whose evals are watched:
    what llama_cpp.Llama becomes for the upstream tests."""

    class Llama(arkv_local.Llama):
        __doc__ = f"arkv_local.Llama with {knobs} (upstream_plugin)."

        def __init__(self, model_path: Any = None, **kwargs: Any) -> None:
            super().__init__(model_path, **{**knobs, **kwargs})

        def eval(self, tokens: Any) -> None:
            super().eval(tokens)
            if _RUN is not None and _RUN.current is not None:
                _RUN.current.cache.observe(self)

    return Llama


def _hf_hub_download(repo_id: str, filename: str, *args: Any, **kwargs: Any) -> str:
    """No network: the default model for the transformer GGUFs the tests fetch."""
    if (repo_id, filename) in DEFAULT_MODEL_FOR:
        return str(arkv_local.default_model_path())
    raise RuntimeError(f"upstream_plugin: no stand-in for {repo_id}/{filename} (no network): "
                       "add the test to SKIPS")


def _log_softmax(x: Any, axis: int | None = None) -> np.ndarray:
    """scipy.special.log_softmax in numpy (test_llama.py imports it, and never calls it)."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def pytest_configure(config: pytest.Config) -> None:
    """Set up the run before the upstream modules import llama_cpp.Llama and hf_hub_download."""
    global _RUN
    import huggingface_hub
    import llama_cpp

    reference = os.environ.get("ARKV_UPSTREAM_REFERENCE")
    _RUN = Run(os.environ.get("ARKV_UPSTREAM_RUN", "full"),
               Path(reference) if reference else None)
    llama_cpp.Llama = run_llama(_RUN.knobs)  # type: ignore[misc]
    huggingface_hub.hf_hub_download = _hf_hub_download  # type: ignore[assignment]
    if importlib.util.find_spec("scipy") is None:  # not a dependency of ours
        special = types.ModuleType("scipy.special")
        special.log_softmax = _log_softmax  # type: ignore[attr-defined]
        scipy = types.ModuleType("scipy")
        scipy.special = special  # type: ignore[attr-defined]
        sys.modules.update({"scipy": scipy, "scipy.special": special})
        _RUN.stand_ins.append("scipy.special.log_softmax (numpy)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the tests of SKIPS, with their reason."""
    for item in items:
        if item.nodeid in SKIPS:
            item.add_marker(pytest.mark.skip(reason=SKIPS[item.nodeid]))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The test whose evals and expect() calls follow."""
    assert _RUN is not None
    _RUN.current_id = item.nodeid
    _RUN.current = _RUN.tests.setdefault(item.nodeid, UpstreamTest())


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Nothing is recorded between tests."""
    assert _RUN is not None
    _RUN.current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test's outcome: failed in any phase, else skipped, else passed in its call."""
    assert _RUN is not None
    rec = _RUN.tests.setdefault(report.nodeid, UpstreamTest())
    if report.failed and rec.outcome != "failed":  # in any phase, over any other outcome
        rec.outcome = "failed"
        lines = report.longreprtext.strip().splitlines() or [""]
        errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]  # pytest's "E   ..."
        rec.reason = f"{report.when}: {(errors or lines[-1:])[0][:300]}"
    elif report.skipped and not rec.outcome:
        rec.outcome = "skipped"
        longrepr = report.longrepr
        rec.reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    elif report.passed and report.when == "call" and not rec.outcome:
        rec.outcome = "passed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the report, whatever the exit status (the outcomes are in it)."""
    out = os.environ.get("ARKV_UPSTREAM_REPORT")
    if out and _RUN is not None:
        Path(out).write_text(json.dumps(_RUN.report(), indent=1))
