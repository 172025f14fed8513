"""arkv_local: long-context LLMs locally under a fixed KV-cache memory budget.

A patched llama.cpp whose KV cache keeps each token, per layer and KV head, in f16, 4-bit
or evicted (ARKV), driven through a drop-in subclass of llama_cpp.Llama.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from .models import check_gguf, default_model_path
from .policies import Policy

__version__ = version("arkv_local")
__all__ = ["KV_POLICIES", "KVStats", "LayerKVStats", "Llama", "Policy", "arkv_cpp", "check_gguf",
           "default_model_path"]

try:
    from . import arkv_cpp  # binds llama_cpp to our libllama before anything imports it
except ImportError as e:  # not built: policies (numpy only) still import; Llama raises this
    _native_error: ImportError | None = e
else:
    _native_error = None
    from .llama import KV_POLICIES, Llama
    from .tailoring import KVStats, LayerKVStats


def __getattr__(name: str) -> Any:
    """Without the native library, what needs it raises the reason it is missing."""
    if _native_error is not None and name in __all__:
        raise ImportError(f"arkv_local.{name} needs the native library: {_native_error}") \
            from _native_error
    raise AttributeError(f"module 'arkv_local' has no attribute {name!r}")
