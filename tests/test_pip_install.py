"""The README's pip route, in a fresh venv: one native build, ours.

`CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install --no-cache-dir .` builds two
packages from source (llama-cpp-python has no wheel on PyPI), and CMAKE_ARGS reaches both:
llama-cpp-python's switches turn its llama.cpp build off (it installs as pure Python), and ours,
which ignores them, builds the patched libllama into arkv_local/lib.

It compiles llama.cpp from scratch (about 10 minutes on 2 cores), so it is marked `pip_install`:
CI runs it (`make test`); `PYTEST_ADDOPTS='-m "not pip_install"' make test` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_packaging import check_only_the_package

from arkv_local._vendor import cache_dir

ROOT = Path(__file__).resolve().parent.parent
SWITCHES = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
ROUTE = f'CMAKE_ARGS="{SWITCHES}" pip install --no-cache-dir .'
NATIVE = re.compile(r"(lib)?(llama|ggml|mtmd)([-.]\w+)*\.(so|dylib|dll)(\.\d+)*$")

pytestmark = pytest.mark.pip_install

# In the new venv, from a directory without the checkout: what got installed, what got loaded
# (llama_cpp imported first, as code written for it does: the .pth file binds it to ours).
PROBE = """
import importlib.metadata as md, json, pathlib
import llama_cpp.llama_cpp
from arkv_local import Llama
llm = Llama(kv_policy="arkv", kv_budget=256, verbose=False)
out = llm("The capital of France is", max_tokens=8)
print(json.dumps({
    "site": str(pathlib.Path(md.distribution("arkv_local").locate_file("")).resolve()),
    "arkv_local": [str(f) for f in md.distribution("arkv_local").files],
    "llama_cpp_python": [str(f) for f in md.distribution("llama_cpp_python").files],
    "loaded": str(pathlib.Path(llama_cpp.llama_cpp._lib._name).resolve()),
    "tokens": out["usage"]["completion_tokens"],
}))
"""


def copy_checkout(dest: Path) -> Path:
    """The files a clone has, as they are now (edits and untracked files included; not the
    ignored ones: .venv, build/, vendor/llama.cpp)."""
    ls = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        cwd=ROOT, capture_output=True)
    if ls.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in filter(None, ls.stdout.decode().split("\0")):
        if (ROOT / rel).is_file():  # not a deletion still in the index
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def run_in(venv: Path, code: str, cwd: Path, env: dict[str, str]) -> dict:
    bindir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    run = subprocess.run([str(bindir / "python"), "-c", code], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_readme_pip_route_builds_one_library(tmp_path: Path, smollm2: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert ROUTE in readme, "the README's pip route changed: change ROUTE with it"

    src = copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LLAMA_CPP_LIB_PATH", "PIP_NO_CACHE_DIR")}
    env["CMAKE_ARGS"] = f"{SWITCHES} {os.environ.get('CMAKE_ARGS', '')}".strip()

    # --no-cache-dir, except that downloads are kept between runs: a cache of our own whose
    # built wheels are dropped, so llama-cpp-python is built by this route every time, and the
    # library-less wheel it builds never reaches the user's pip cache.
    pip_cache = cache_dir() / "pip-route-test"
    shutil.rmtree(pip_cache / "wheels", ignore_errors=True)
    log = tmp_path / "pip.log"
    with open(log, "w") as out:
        pip = subprocess.run(
            [str(bindir / "python"), "-m", "pip", "install", "-v", "--cache-dir", str(pip_cache),
             "."], cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    assert pip.returncode == 0, log.read_text()[-6000:]
    built = log.read_text()
    assert "Building wheel for llama-cpp-python" in built  # built here, not taken from a cache

    got = run_in(venv, PROBE, tmp_path, env)
    site = Path(got["site"])
    natives = sorted(p.relative_to(site).as_posix() for p in site.rglob("*")
                     if NATIVE.match(p.name))
    assert natives, "no native library installed"
    assert all(n.startswith("arkv_local/lib/") for n in natives), natives
    assert len([n for n in natives if Path(n).name.startswith(("libllama.", "llama."))]) == 1
    assert not [f for f in got["llama_cpp_python"] if NATIVE.match(f.rsplit("/", 1)[-1])]
    check_only_the_package(got["arkv_local"])
    assert Path(got["loaded"]).parent == (site / "arkv_local" / "lib").resolve()
    assert got["tokens"] > 0

    # Without the switches llama-cpp-python installs its own build in llama_cpp/lib: arkv_local
    # still binds llama_cpp to its own (copies of ours stand in for that build here).
    theirs = site / "llama_cpp" / "lib"
    shutil.copytree(site / "arkv_local" / "lib", theirs)
    again = run_in(venv, PROBE, tmp_path, env)
    assert Path(again["loaded"]).parent == (site / "arkv_local" / "lib").resolve()

    shutil.rmtree(src)  # kept (with the log and the venv) only when the test fails
    shutil.rmtree(venv)
