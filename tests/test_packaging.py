"""The installed wheel holds arkv_local and nothing else: llama.cpp's own install rules (lib/,
include/, lib/cmake/, lib/pkgconfig/) would land at the top of site-packages, where
llama-cpp-python's own build writes the same paths, and one uninstall would delete the other's."""

from __future__ import annotations

import importlib.metadata
import re

import pytest


def wheel_files() -> list[str]:
    """The files pip installed from arkv_local's wheel (its RECORD), as written there."""
    try:
        dist = importlib.metadata.distribution("arkv_local")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("arkv_local is not installed (make install)")
    return [str(f) for f in dist.files or []]


def check_only_the_package(files: list[str]) -> None:
    """files (a RECORD of arkv_local's wheel) are the package, its libraries, its scripts and
    the .pth file that binds llama_cpp to its libllama."""
    allowed = re.compile(
        r"arkv_local/|arkv_local-[^/]+\.dist-info/|(\.\./)+bin/arkv-(chat|server)$|arkv_local\.pth$")
    assert [f for f in files if not allowed.match(f)] == []
    assert "arkv_local.pth" in files
    libs = {f.rsplit("/", 1)[1] for f in files if f.startswith("arkv_local/lib/")}
    assert {"libllama.so", "libggml.so", "libggml-base.so"} <= libs or \
        {"libllama.dylib", "libggml.dylib"} <= libs or {"llama.dll", "ggml.dll"} <= libs
    assert not any(f.startswith("arkv_local/csrc/") for f in files)  # sources stay out


def test_the_installed_wheel_holds_only_the_package() -> None:
    check_only_the_package(wheel_files())


def test_the_build_leaves_out_ggml_amx_kernels() -> None:
    """ggml's AMX matmul faults on VMs that show AMX in CPUID but do not grant the tile state
    (a Firecracker VM here, every model load): CMakeLists.txt builds it only with ARKV_AMX=ON."""
    import arkv_local  # noqa: F401, I001  (first: llama_cpp then loads our libllama)
    from llama_cpp import llama_cpp as lib

    info = lib.llama_print_system_info().decode()
    assert info.startswith("CPU : ") and "AMX_INT8 = 1" not in info
