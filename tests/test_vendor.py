"""The vendor step: pinned sdist -> vendor/llama.cpp -> patches/, on a fake sdist."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from arkv_local import _vendor

FILES = {"src/a.c": "int a = 1;\nint keep = 0;\n", "src/b.c": "int b = 2;\n"}
PATCH_A = """--- a/src/a.c
+++ b/src/a.c
@@ -1,2 +1,2 @@
-int a = 1;
+int a = 10;
 int keep = 0;
"""


def make_sdist(path: Path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"fake_pkg-1.0/vendor/llama.cpp/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    sdist = tmp_path / "fake_pkg-1.0.tar.gz"
    sha = make_sdist(sdist, FILES)
    (tmp_path / "vendor").mkdir()
    (tmp_path / "patches").mkdir()
    pin = {"package": "fake-pkg", "version": "1.0", "sdist_sha256": sha}
    (tmp_path / "vendor" / "pin.json").write_text(json.dumps(pin))
    monkeypatch.setenv(_vendor.SDIST_ENV, str(sdist))
    return tmp_path


def test_prepare_unpacks_and_patches(root: Path) -> None:
    (root / "patches" / "0001-a.patch").write_text(PATCH_A)
    tree = _vendor.prepare(root)
    assert (tree / "src/a.c").read_text() == "int a = 10;\nint keep = 0;\n"
    assert (tree / "src/b.c").read_text() == FILES["src/b.c"]
    stamp = json.loads((tree / _vendor.STAMP).read_text())
    assert stamp["touched"] == ["src/a.c"]


def test_prepare_twice_touches_nothing(root: Path) -> None:
    (root / "patches" / "0001-a.patch").write_text(PATCH_A)
    tree = _vendor.prepare(root)
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    _vendor.prepare(root)
    assert before == {p: p.stat().st_mtime_ns for p in tree.rglob("*")}


def test_changed_patch_rewrites_only_touched_files(root: Path) -> None:
    patch = root / "patches" / "0001-a.patch"
    patch.write_text(PATCH_A)
    tree = _vendor.prepare(root)
    b_mtime = (tree / "src/b.c").stat().st_mtime_ns
    patch.write_text(PATCH_A.replace("int a = 10;", "int a = 20;"))
    _vendor.prepare(root)
    assert (tree / "src/a.c").read_text() == "int a = 20;\nint keep = 0;\n"
    assert (tree / "src/b.c").stat().st_mtime_ns == b_mtime
    patch.unlink()
    _vendor.prepare(root)
    assert (tree / "src/a.c").read_text() == FILES["src/a.c"]


def test_hash_mismatch_is_named(root: Path) -> None:
    pin = json.loads((root / "vendor" / "pin.json").read_text())
    pin["sdist_sha256"] = "0" * 64
    (root / "vendor" / "pin.json").write_text(json.dumps(pin))
    with pytest.raises(_vendor.VendorError, match=r"sha256 mismatch .* expected 0{64}"):
        _vendor.prepare(root)
    assert not (root / "vendor" / "llama.cpp").exists()


def test_patch_that_does_not_apply_is_named(root: Path) -> None:
    (root / "patches" / "0001-a.patch").write_text(PATCH_A)
    (root / "patches" / "0002-stale.patch").write_text(
        PATCH_A.replace("-int a = 1;\n+int a = 10;", "-int a = 3;\n+int a = 4;"))
    with pytest.raises(_vendor.VendorError, match=r"patch 0002-stale\.patch does not apply"):
        _vendor.prepare(root)
    # no stamp: the next build retries instead of trusting a half-patched tree
    assert not (root / "vendor" / "llama.cpp" / _vendor.STAMP).exists()


def test_git_apply_fallback(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = _vendor.shutil.which
    monkeypatch.setattr(_vendor.shutil, "which", lambda n: None if n == "patch" else real_which(n))
    (root / "patches" / "0001-a.patch").write_text(PATCH_A)
    tree = _vendor.prepare(root)
    assert (tree / "src/a.c").read_text().startswith("int a = 10;")


def test_no_patch_tool_is_named(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vendor.shutil, "which", lambda n: None)
    (root / "patches" / "0001-a.patch").write_text(PATCH_A)
    with pytest.raises(_vendor.VendorError, match="neither `patch` nor `git`"):
        _vendor.prepare(root)


def test_missing_local_sdist_is_named(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_vendor.SDIST_ENV, str(root / "nowhere.tar.gz"))
    with pytest.raises(_vendor.VendorError, match="nowhere.tar.gz is not a file"):
        _vendor.prepare(root)


def test_diff_writes_a_patch_that_reproduces_the_edit(root: Path) -> None:
    tree = _vendor.prepare(root)
    (tree / "src/b.c").write_text("int b = 3;\n")
    patch = _vendor.diff("0001-b.patch", ["src/b.c"], root)
    assert _vendor.touched_paths(patch) == ["src/b.c"]
    (tree / "src/b.c").write_text("garbage\n")
    _vendor.prepare(root)  # restores the pristine file, then applies the new patch
    assert (tree / "src/b.c").read_text() == "int b = 3;\n"


def test_pin_matches_the_python_dependency() -> None:
    repo = Path(__file__).resolve().parent.parent
    pin = _vendor.read_pin(repo)
    pyproject = (repo / "pyproject.toml").read_text()
    assert re.search(rf'"{pin.package}=={re.escape(pin.version)}"', pyproject)
