"""`arkv_local.Llama`: llama_cpp.Llama over arkv_local's libllama, plus the KV policy."""

from __future__ import annotations

import os
from typing import Any

import llama_cpp

from .models import check_gguf, default_model_path

KV_POLICIES = ("full",)


class Llama(llama_cpp.Llama):
    """Drop-in for `llama_cpp.Llama` (same methods and arguments) with a KV-cache policy.

    `model_path` may be omitted: the default model (SmolLM2-135M-Instruct) is used.
    `kv_policy="full"` keeps every token in f16, exactly as llama.cpp does.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        kv_policy: str = "full",
        **kwargs: Any,
    ) -> None:
        if kv_policy not in KV_POLICIES:
            raise ValueError(
                f"unknown kv_policy {kv_policy!r}: choose one of {', '.join(KV_POLICIES)}"
            )
        path = default_model_path() if model_path is None else check_gguf(model_path)
        self.kv_policy = kv_policy
        super().__init__(os.fspath(path), **kwargs)

    def close(self) -> None:
        """As llama_cpp.Llama.close; also safe when __init__ refused its arguments early."""
        if hasattr(self, "_stack"):
            super().close()

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, repo_id: str, filename: str | None, *args: Any, **kwargs: Any
    ) -> Llama:
        """As llama_cpp.Llama.from_pretrained (huggingface-hub), with a clear network error."""
        try:
            return super().from_pretrained(repo_id, filename, *args, **kwargs)
        except (ValueError, TypeError, ImportError):
            raise
        except Exception as e:  # huggingface-hub raises transport-specific errors
            raise ConnectionError(
                f"could not fetch {filename!r} from the Hugging Face Hub repo {repo_id!r} "
                f"({type(e).__name__}: {e}); without network, download the GGUF elsewhere "
                "and pass model_path=..."
            ) from e
