"""A Llama's saved state with its KV policy's Python side, and a file format for it that is
data only (a zip of JSON, .npy arrays and llama.cpp's raw state bytes): loading it never runs
code, unlike a pickle."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

FORMAT = "arkv-chat session"
VERSION = 1
Messages = list[dict[str, str]]


class ArkvState(llama_cpp.LlamaState):
    """llama_cpp's LlamaState plus `session`: the policy's Session.snapshot() (None under
    "full"). It pickles as plain data, so llama_cpp's RAM and disk caches keep it whole."""

    def __init__(self, base: llama_cpp.LlamaState, session: dict[str, Any] | None) -> None:
        super().__init__(base.input_ids, base.scores, base.n_tokens, base.llama_state,
                         base.llama_state_size, base.seed)
        self.session = session


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _not_ours() -> ValueError:
    return ValueError(f"not an {FORMAT} file (one that /save writes)")


def save(path: str | Path, messages: Messages, state: llama_cpp.LlamaState) -> None:
    """Write a conversation and the model's state to `path`."""
    manifest = {"format": FORMAT, "version": VERSION, "n_tokens": int(state.n_tokens),
                "llama_state_size": int(state.llama_state_size), "seed": int(state.seed),
                "session": getattr(state, "session", None)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("messages.json", json.dumps(messages))
        z.writestr("input_ids.npy", _npy(state.input_ids))
        z.writestr("scores.npy", _npy(state.scores))
        z.writestr("llama_state.bin", bytes(state.llama_state))


def load(path: str | Path) -> tuple[Messages, ArkvState]:
    """Read what save() wrote; ValueError for any other file (FileNotFoundError if none)."""
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    if not zipfile.is_zipfile(path):
        raise _not_ours()
    with zipfile.ZipFile(path) as z:
        try:
            manifest = json.loads(z.read("manifest.json"))
            if manifest.get("format") != FORMAT:
                raise _not_ours()
            if manifest.get("version") != VERSION:
                raise ValueError(f"{FORMAT} version {manifest.get('version')!r}: this arkv_local "
                                 f"reads version {VERSION}")
            messages = json.loads(z.read("messages.json"))
            input_ids = np.load(io.BytesIO(z.read("input_ids.npy")), allow_pickle=False)
            scores = np.load(io.BytesIO(z.read("scores.npy")), allow_pickle=False)
            raw = z.read("llama_state.bin")
        except (KeyError, AttributeError, json.JSONDecodeError) as e:
            raise _not_ours() from e
    if not (isinstance(messages, list) and all(
            isinstance(m, dict) and all(isinstance(v, str) for v in m.values())
            for m in messages)):
        raise ValueError(f"{path}: the messages are not a list of role/content texts")
    if len(raw) != manifest["llama_state_size"]:
        raise ValueError(f"{path}: the llama state is {len(raw)} bytes, "
                         f"not the {manifest['llama_state_size']} recorded")
    base = llama_cpp.LlamaState(input_ids, scores, int(manifest["n_tokens"]), raw, len(raw),
                                int(manifest["seed"]))
    return messages, ArkvState(base, manifest["session"])
