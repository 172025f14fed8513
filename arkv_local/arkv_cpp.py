"""ctypes bindings of arkv_local's C API (arkv_local/csrc/llama-arkv.h), llama_cpp style.

Importing this module binds llama-cpp-python to the libllama that arkv_local builds:
one native library serves both llama_cpp's API and ours.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from pathlib import Path


def _lib_dir() -> Path:
    """The package's lib/; from a source checkout, the installed package's (Python edits
    then take effect without a rebuild)."""
    here = Path(__file__).resolve().parent / "lib"
    if here.is_dir():
        return here
    try:
        dist = importlib.metadata.distribution("arkv_local")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    installed = Path(dist.locate_file("arkv_local/lib")).resolve() if dist else here
    if not installed.is_dir():
        raise ImportError(
            f"arkv_local's native library is not built (looked in {here} and {installed}): "
            "build and install the package with `make install` or `pip install .`"
        )
    return installed


LIB_DIR = _lib_dir()


def _bind_llama_cpp() -> ctypes.CDLL:
    """Point llama_cpp at LIB_DIR before its first import and check that it loaded ours."""
    if "llama_cpp.llama_cpp" not in sys.modules:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
    import llama_cpp.llama_cpp as llama_cpp

    lib = llama_cpp._lib
    if not hasattr(lib, "llama_arkv_version"):
        raise ImportError(
            f"llama_cpp was imported before arkv_local and bound to {lib._name}, which is not "
            "arkv_local's libllama: import arkv_local first"
        )
    return lib


_lib = _bind_llama_cpp()

from llama_cpp._ctypes_extensions import ctypes_function_for_shared_library  # noqa: E402

ctypes_function = ctypes_function_for_shared_library(_lib)


# LLAMA_API const char * llama_arkv_version(void);
@ctypes_function("llama_arkv_version", [], ctypes.c_char_p)
def llama_arkv_version() -> bytes:
    """Identifies a libllama built by arkv_local."""
    ...
