"""Fill vendor/llama.cpp from the pinned llama-cpp-python sdist and apply patches/.

Runs at build time (CMakeLists.txt calls it as a script), so it uses the standard
library only and never imports the rest of the package.

    python arkv_local/_vendor.py prepare            # fetch, verify, unpack, patch
    python arkv_local/_vendor.py sdist              # print the verified sdist's path
    python arkv_local/_vendor.py diff NAME FILE...  # write patches/NAME from edited files
    python arkv_local/_vendor.py tests              # unpack llama-cpp-python's own tests/
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST_ENV = "ARKV_LLAMA_CPP_SDIST"  # a local copy of the sdist, for offline builds
STAMP = ".arkv-stamp.json"


# Python's tar "data" filter (3.10.12+, 3.11.4+) refuses links and paths out of dest.
_SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class VendorError(RuntimeError):
    """A problem preparing vendor/llama.cpp, with a message that names it."""


@dataclass(frozen=True)
class Pin:
    """The llama-cpp-python release whose vendored llama.cpp we build."""

    package: str
    version: str
    sdist_sha256: str

    @property
    def sdist_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}.tar.gz"

    @property
    def root_prefix(self) -> str:
        """The sdist's top directory, as its member names start."""
        return f"{self.package.replace('-', '_')}-{self.version}/"

    @property
    def tree_prefix(self) -> str:
        """Path of llama.cpp inside the sdist."""
        return f"{self.root_prefix}vendor/llama.cpp/"


def read_pin(root: Path = ROOT) -> Pin:
    return Pin(**json.loads((root / "vendor" / "pin.json").read_text()))


def cache_dir() -> Path:
    base = os.environ.get("ARKV_LOCAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "arkv_local"
    )
    return Path(base)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, pin: Pin) -> Path:
    got = sha256_of(path)
    if got != pin.sdist_sha256:
        raise VendorError(
            f"sha256 mismatch for {path}: expected {pin.sdist_sha256} "
            f"(vendor/pin.json, {pin.package} {pin.version}), got {got}. "
            "Delete the file or fix the pin."
        )
    return path


def find_sdist(pin: Pin) -> Path:
    """The verified sdist: from $ARKV_LLAMA_CPP_SDIST, the cache, or PyPI via pip."""
    local = os.environ.get(SDIST_ENV)
    if local:
        path = Path(local)
        if not path.is_file():
            raise VendorError(f"{SDIST_ENV}={local} is not a file")
        return verify(path, pin)
    cached = cache_dir() / "sdist" / pin.sdist_name
    if cached.is_file():
        return verify(cached, pin)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-d", tmp, f"{pin.package}=={pin.version}"]
        print(f"arkv_local: fetching {pin.package} {pin.version} sdist from PyPI",
              file=sys.stderr, flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pin.sdist_name
        if run.returncode != 0 or not got.is_file():
            raise VendorError(
                f"could not fetch {pin.package}=={pin.version} with pip "
                f"(set {SDIST_ENV} to a local copy for offline builds):\n{run.stderr[-2000:]}"
            )
        verify(got, pin)
        os.replace(got, cached)
    return cached


def patch_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "patches").glob("*.patch"))


def touched_paths(patch: Path) -> list[str]:
    """Files (relative to llama.cpp) that a -p1 unified diff changes."""
    return re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M)


def extract(sdist: Path, pin: Pin, dest: Path, only: set[str] | None = None) -> None:
    """Unpack llama.cpp (or only the given relative paths) from the sdist into dest."""
    with tarfile.open(sdist) as tar:
        for member in tar:
            if not member.name.startswith(pin.tree_prefix):
                continue
            rel = member.name[len(pin.tree_prefix):]
            if not rel or (only is not None and rel not in only):
                continue
            member.name = rel
            tar.extract(member, dest, **_SAFE_EXTRACT)


def apply_patch(patch: Path, tree: Path, pin: Pin) -> None:
    """Apply one -p1 patch; a patch that does not apply is an error naming it."""
    tool = shutil.which("patch")
    if tool:
        cmd = [tool, "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i", str(patch)]
        check = [*cmd[:1], "--dry-run", *cmd[1:]]
        env = None
    elif shutil.which("git"):
        # Without a repository above it, `git apply` patches the working directory.
        cmd = ["git", "apply", "-p1", str(patch)]
        check = ["git", "apply", "--check", "-p1", str(patch)]
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
    else:
        raise VendorError("neither `patch` nor `git` was found: install one to patch llama.cpp")
    for argv in (check, cmd):
        run = subprocess.run(argv, cwd=tree, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise VendorError(
                f"patch {patch.name} does not apply to llama.cpp from {pin.package} "
                f"{pin.version}:\n{(run.stdout + run.stderr).strip()}"
            )


def prepare(root: Path = ROOT) -> Path:
    """Make vendor/llama.cpp the pinned tree with patches/ applied; cheap when it already is.

    When only patches changed, just the files they touch are restored and re-patched,
    so an incremental build recompiles those files alone.
    """
    pin = read_pin(root)
    tree = root / "vendor" / "llama.cpp"
    patches = patch_files(root)
    want = {"sdist_sha256": pin.sdist_sha256,
            "patches": {p.name: sha256_of(p) for p in patches},
            "touched": sorted({f for p in patches for f in touched_paths(p)})}
    stamp_path = tree / STAMP
    have = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
    if have == want:
        return tree
    sdist = find_sdist(pin)
    if have is None or have.get("sdist_sha256") != pin.sdist_sha256:
        tmp = root / "vendor" / ".llama.cpp.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        extract(sdist, pin, tmp)
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
    else:
        extract(sdist, pin, tree, only=set(have.get("touched", [])) | set(want["touched"]))
    stamp_path.unlink(missing_ok=True)
    for p in patches:
        apply_patch(p, tree, pin)
    stamp_path.write_text(json.dumps(want, indent=1))
    return tree


# llama-cpp-python's own test suite and the one file it opens from the sdist (its MODEL, a vocab)
UPSTREAM_TESTS = ("tests/", "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")


def upstream_tests(dest: Path | None = None, root: Path = ROOT) -> Path:
    """llama-cpp-python's own tests (UPSTREAM_TESTS) unpacked from the pinned sdist, once: into
    dest (default: the cache) under a name with the sdist's hash, reused while its stamp is there.

    Returns the directory the tests run from (they open ./vendor/llama.cpp/models/...). Unpacked
    in a temporary directory renamed into place, so concurrent callers never see half of it.
    """
    pin = read_pin(root)
    base = dest if dest is not None else cache_dir() / "upstream-tests"
    out = base / f"{pin.root_prefix.rstrip('/')}-{pin.sdist_sha256[:12]}"
    if (out / STAMP).is_file():
        return out
    sdist = find_sdist(pin)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".unpack-"))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                rel = member.name.removeprefix(pin.root_prefix)
                if rel == member.name or not any(
                        rel.startswith(p) if p.endswith("/") else rel == p
                        for p in UPSTREAM_TESTS):
                    continue
                member.name = rel
                tar.extract(member, tmp, **_SAFE_EXTRACT)
        if not (tmp / "tests").is_dir():
            raise VendorError(f"{sdist.name} has no tests/ directory")
        (tmp / STAMP).write_text(json.dumps({"sdist_sha256": pin.sdist_sha256,
                                             "members": list(UPSTREAM_TESTS)}, indent=1))
        try:
            tmp.rename(out)
        except OSError:  # another process put it there first
            if not (out / STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def diff(name: str, files: list[str], root: Path = ROOT) -> Path:
    """Write patches/<name> as the difference between the pinned and the edited files."""
    pin = read_pin(root)
    tree = root / "vendor" / "llama.cpp"
    out = []
    with tarfile.open(find_sdist(pin)) as tar:
        for rel in files:
            member = tar.extractfile(pin.tree_prefix + rel)
            if member is None:
                raise VendorError(f"{rel} is not in the pinned llama.cpp")
            old = member.read().decode().splitlines(keepends=True)
            new = (tree / rel).read_text().splitlines(keepends=True)
            out += difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}")
    if not out:
        raise VendorError(f"{', '.join(files)}: no change against the pinned llama.cpp")
    target = root / "patches" / name
    target.write_text("".join(out))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="_vendor.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fetch, verify, unpack and patch vendor/llama.cpp")
    sub.add_parser("sdist", help="print the path of the verified sdist, fetching it if needed")
    d = sub.add_parser("diff", help="write patches/NAME from edited vendor/llama.cpp files")
    d.add_argument("name")
    d.add_argument("files", nargs="+", help="paths relative to vendor/llama.cpp")
    sub.add_parser("tests", help="unpack llama-cpp-python's own tests/ and print where")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "prepare":
            print(f"arkv_local: llama.cpp ready in {prepare()}")
        elif args.cmd == "sdist":
            print(find_sdist(read_pin()))
        elif args.cmd == "tests":
            print(upstream_tests())
        else:
            print(f"arkv_local: wrote {diff(args.name, args.files)}")
    except VendorError as e:
        print(f"arkv_local: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
