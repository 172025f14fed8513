"""Tiny random-weight GGUF models (Llama-3 and Qwen3 shaped) that llama.cpp loads and decodes.

They let tests exercise the real loading, tokenizing, decoding and KV-cache code in seconds,
without downloading a model.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _vendor

__all__ = [
    "ARCHS",
    "LLAMA3_CHAT_TEMPLATE",
    "CHATML_CHAT_TEMPLATE",
    "cache_dir",
    "tiny_model_path",
    "tiny_vocab",
    "write_tiny_model",
]

ARCHS = ("llama", "qwen3")
DTYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # numpy type, general.file_type
FORMAT_VERSION = 1  # part of cached file names: bump when the written files change

# Byte-for-byte the templates llama-cpp-python recognises (its LLAMA3_INSTRUCT_CHAT_TEMPLATE and
# CHATML_CHAT_TEMPLATE), so it picks its "llama-3" / "chatml" chat formats for these models.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A few byte-level BPE merges (GPT-2 alphabet, "Ġ" is the space byte); later merges may build
# on earlier ones. Each adds one normal token.
_MERGES = (
    ("h", "e"),
    ("l", "l"),
    ("Ġ", "t"),
    ("Ġ", "w"),
    ("o", "r"),
    ("i", "n"),
    ("e", "r"),
    ("Ġt", "he"),
)

# gguf token types (llama_token_type)
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3


@dataclass(frozen=True)
class _ArchSpec:
    rope_theta: float
    rms_eps: float
    pre: str
    specials: tuple[str, ...]
    bos: str
    eos: str
    eot: str
    pad: str | None
    add_bos: bool
    chat_template: str
    qk_norm: bool


_SPECS = {
    "llama": _ArchSpec(
        rope_theta=500000.0,
        rms_eps=1e-5,
        pre="llama-bpe",
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        eot="<|eot_id|>",
        pad=None,
        add_bos=True,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        qk_norm=False,
    ),
    "qwen3": _ArchSpec(
        rope_theta=1000000.0,
        rms_eps=1e-6,
        pre="qwen2",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|endoftext|>",
        eos="<|im_end|>",
        eot="<|im_end|>",
        pad="<|endoftext|>",
        add_bos=False,
        chat_template=CHATML_CHAT_TEMPLATE,
        qk_norm=True,
    ),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_vocab(arch: str = "llama") -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """The tokenizer written for ``arch``: (tokens, token types, merges, special token ids).

    Ids 0-255 are the byte-level tokens in byte order, then one token per merge, then the
    control tokens the chat template needs.
    """
    spec = _spec(arch)
    byte_map = _bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)]
    merges = []
    for left, right in _MERGES:
        if left not in tokens or right not in tokens:
            raise AssertionError(f"merge {left!r} {right!r} uses an unknown token")
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    types = [TOKEN_NORMAL] * len(tokens)
    specials = {}
    for text in spec.specials:
        specials[text] = len(tokens)
        tokens.append(text)
        types.append(TOKEN_CONTROL)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in the tiny vocabulary")
    return tokens, types, merges, specials


def _spec(arch: str) -> _ArchSpec:
    try:
        return _SPECS[arch]
    except KeyError:
        raise ValueError(
            f"unknown arch {arch!r}: tiny models exist for {', '.join(ARCHS)}"
        ) from None


def _check_shapes(
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int | None,
    n_ff: int,
    n_ctx_train: int,
    dtype: str,
) -> int:
    """Validate the hyperparameters; return the head dimension."""
    for name, value in (
        ("n_layer", n_layer),
        ("n_embd", n_embd),
        ("n_head", n_head),
        ("n_head_kv", n_head_kv),
        ("n_ff", n_ff),
        ("n_ctx_train", n_ctx_train),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_layer > 512:
        raise ValueError(f"n_layer={n_layer} exceeds llama.cpp's limit of 512 layers")
    if n_head % n_head_kv != 0:
        raise ValueError(f"n_head={n_head} is not divisible by n_head_kv={n_head_kv}")
    if head_dim is None:
        if n_embd % n_head != 0:
            raise ValueError(
                f"n_embd={n_embd} is not divisible by n_head={n_head}; pass head_dim explicitly"
            )
        head_dim = n_embd // n_head
    elif isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return int(head_dim)


def write_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: str = "f32",
    head_dim: int | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """Write a tiny random-weight GGUF model of ``arch`` ("llama" or "qwen3") to ``path``.

    Weights are N(0, 0.02) from ``numpy.random.default_rng(seed)`` (norm weights are 1), so a
    seed always gives the same bytes. ``dtype`` ("f32" or "f16") applies to the matrices; norms
    stay f32. ``head_dim`` defaults to ``n_embd // n_head`` and is written as the attention
    key/value length. A quantized (e.g. q4_0) KV cache needs ``head_dim`` to be a multiple of 32.
    With ``tie_embeddings`` there is no ``output.weight`` and llama.cpp reuses ``token_embd``.

    Raises ValueError for an unknown arch or dtype, or inconsistent shapes.
    """
    import gguf  # imported here so that importing this module does not need it

    spec = _spec(arch)
    hd = _check_shapes(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_ctx_train, dtype)
    np_dtype, file_type = DTYPES[dtype]
    tokens, types, merges, specials = tiny_vocab(arch)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        # numpy shape (rows, cols) is ggml ne = {cols, rows}
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np_dtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", mat(n_vocab, n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", ones(n_embd)),
            (p + "attn_q.weight", mat(n_head * hd, n_embd)),
            (p + "attn_k.weight", mat(n_head_kv * hd, n_embd)),
            (p + "attn_v.weight", mat(n_head_kv * hd, n_embd)),
            (p + "attn_output.weight", mat(n_embd, n_head * hd)),
        ]
        if spec.qk_norm:
            tensors += [(p + "attn_q_norm.weight", ones(hd)), (p + "attn_k_norm.weight", ones(hd))]
        tensors += [
            (p + "ffn_norm.weight", ones(n_embd)),
            (p + "ffn_gate.weight", mat(n_ff, n_embd)),
            (p + "ffn_up.weight", mat(n_ff, n_embd)),
            (p + "ffn_down.weight", mat(n_embd, n_ff)),
        ]
    tensors.append(("output_norm.weight", ones(n_embd)))
    if not tie_embeddings:
        tensors.append(("output.weight", mat(n_vocab, n_embd)))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)  # writes general.architecture
    try:
        w.add_string("general.name", f"arkv-tiny-{arch}")
        w.add_uint32("general.file_type", file_type)
        w.add_uint32(f"{arch}.vocab_size", n_vocab)
        w.add_uint32(f"{arch}.context_length", n_ctx_train)
        w.add_uint32(f"{arch}.embedding_length", n_embd)
        w.add_uint32(f"{arch}.block_count", n_layer)
        w.add_uint32(f"{arch}.feed_forward_length", n_ff)
        w.add_uint32(f"{arch}.attention.head_count", n_head)
        w.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
        w.add_uint32(f"{arch}.attention.key_length", hd)
        w.add_uint32(f"{arch}.attention.value_length", hd)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", spec.rms_eps)
        w.add_uint32(f"{arch}.rope.dimension_count", hd)
        w.add_float32(f"{arch}.rope.freq_base", spec.rope_theta)

        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", spec.pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", specials[spec.bos])
        w.add_uint32("tokenizer.ggml.eos_token_id", specials[spec.eos])
        w.add_uint32("tokenizer.ggml.eot_token_id", specials[spec.eot])
        if spec.pad is not None:
            w.add_uint32("tokenizer.ggml.padding_token_id", specials[spec.pad])
        w.add_bool("tokenizer.ggml.add_bos_token", spec.add_bos)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        w.add_string("tokenizer.chat_template", spec.chat_template)

        for name, data in tensors:
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


def cache_dir() -> Path:
    """Where :func:`tiny_model_path` keeps its files: the package cache's ``tiny/``."""
    return _vendor.cache_dir() / "tiny"


def _file_name(params: dict[str, object]) -> str:
    hd = params["head_dim"]
    parts = (
        f"{params['arch']}",
        f"L{params['n_layer']}",
        f"E{params['n_embd']}",
        f"H{params['n_head']}",
        f"KV{params['n_head_kv']}",
        f"D{hd if hd is not None else 'auto'}",
        f"F{params['n_ff']}",
        f"C{params['n_ctx_train']}",
        f"s{params['seed']}",
        f"{params['dtype']}",
        "tied" if params["tie_embeddings"] else "untied",
        f"v{FORMAT_VERSION}",
    )
    return "-".join(parts) + ".gguf"


def tiny_model_path(arch: str = "llama", **kwargs: object) -> Path:
    """Path of a cached tiny model written by :func:`write_tiny_model` with these arguments.

    The file lives in :func:`cache_dir`, is named by its parameters, and is (re)written only
    when missing; writes go through a temporary file so concurrent callers never see a
    partial file. Raises TypeError for an unknown keyword and ValueError as write_tiny_model.
    """
    bound = inspect.signature(write_tiny_model).bind("<path>", arch, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    del params["path"]
    _spec(arch)  # fail before touching the cache; write_tiny_model checks the rest
    directory = cache_dir()
    target = directory / _file_name(params)
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write_tiny_model(tmp, arch, **kwargs)  # type: ignore[arg-type]
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
