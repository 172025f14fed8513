"""arkv_local: long-context LLMs locally under a fixed KV-cache memory budget.

A patched llama.cpp whose KV cache keeps each token, per layer and KV head, in f16, 4-bit
or evicted (ARKV), driven through a drop-in subclass of llama_cpp.Llama.
"""

from __future__ import annotations

from importlib.metadata import version

from . import arkv_cpp  # binds llama_cpp to our libllama before anything imports it
from .llama import KV_POLICIES, Llama
from .models import check_gguf, default_model_path
from .policies import Policy
from .tailoring import KVStats, LayerKVStats

__version__ = version("arkv_local")
__all__ = ["KV_POLICIES", "KVStats", "LayerKVStats", "Llama", "Policy", "arkv_cpp", "check_gguf",
           "default_model_path"]
