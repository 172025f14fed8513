"""Tiny random-weight GGUF models: file contents, determinism, cache, and decoding in llama.cpp."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def _load_tiny_models() -> ModuleType:
    try:
        from arkv_local import tiny_models

        return tiny_models
    except ImportError:
        # arkv_local's __init__ needs the native library; the generator does not, so its
        # file tests still run from a source checkout without one.
        src = Path(__file__).resolve().parents[1] / "arkv_local" / "tiny_models.py"
        spec = importlib.util.spec_from_file_location("arkv_local_tiny_models", src)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


tm = _load_tiny_models()

try:
    from arkv_local import Llama
except ImportError as exc:  # no native library reachable: the decoding tests skip
    Llama = None
    NO_LLAMA = f"arkv_local.Llama is not importable: {exc}"
else:
    NO_LLAMA = ""

needs_llama = pytest.mark.skipif(Llama is None, reason=NO_LLAMA)

N_MERGES = 8
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_VOCAB = {"llama": 256 + N_MERGES + 5, "qwen3": 256 + N_MERGES + 3}

# (arch, kwargs, expected metadata, expected ggml shapes {name: ne}, expected tensor count)
CASES = {
    "llama": (
        "llama",
        {},
        {
            "block_count": 2,
            "embedding_length": 64,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "attention.key_length": 16,
            "attention.value_length": 16,
            "rope.dimension_count": 16,
            "feed_forward_length": 128,
            "context_length": 4096,
            "rope.freq_base": 500000.0,
        },
        {
            "token_embd.weight": [64, 269],
            "output.weight": [64, 269],
            "output_norm.weight": [64],
            "blk.1.attn_norm.weight": [64],
            "blk.1.attn_q.weight": [64, 64],
            "blk.1.attn_k.weight": [64, 32],
            "blk.1.attn_v.weight": [64, 32],
            "blk.1.attn_output.weight": [64, 64],
            "blk.1.ffn_norm.weight": [64],
            "blk.1.ffn_gate.weight": [64, 128],
            "blk.1.ffn_up.weight": [64, 128],
            "blk.1.ffn_down.weight": [128, 64],
        },
        1 + 2 * 9 + 2,
    ),
    "qwen3": (
        "qwen3",
        {"n_layer": 3, "n_head": 4, "n_head_kv": 1, "head_dim": 32, "n_ff": 96},
        {
            "block_count": 3,
            "embedding_length": 64,
            "attention.head_count": 4,
            "attention.head_count_kv": 1,
            "attention.key_length": 32,
            "attention.value_length": 32,
            "rope.dimension_count": 32,
            "feed_forward_length": 96,
            "context_length": 4096,
            "rope.freq_base": 1000000.0,
        },
        {
            "token_embd.weight": [64, 267],
            "output.weight": [64, 267],
            "output_norm.weight": [64],
            "blk.2.attn_norm.weight": [64],
            "blk.2.attn_q.weight": [64, 128],
            "blk.2.attn_k.weight": [64, 32],
            "blk.2.attn_v.weight": [64, 32],
            "blk.2.attn_output.weight": [128, 64],
            "blk.2.attn_q_norm.weight": [32],
            "blk.2.attn_k_norm.weight": [32],
            "blk.2.ffn_norm.weight": [64],
            "blk.2.ffn_gate.weight": [64, 96],
            "blk.2.ffn_up.weight": [64, 96],
            "blk.2.ffn_down.weight": [96, 64],
        },
        1 + 3 * 11 + 2,
    ),
}


def _field(reader: gguf.GGUFReader, key: str) -> object:
    assert key in reader.fields, f"missing key {key}"
    return reader.fields[key].contents()


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_file_metadata_and_shapes(tmp_path: Path, case: str) -> None:
    arch, kwargs, meta, shapes, n_tensors = CASES[case]
    path = tm.write_tiny_model(tmp_path / "m.gguf", arch, **kwargs)
    assert path == tmp_path / "m.gguf"
    reader = gguf.GGUFReader(path)

    assert _field(reader, "general.architecture") == arch
    for key, value in meta.items():
        assert _field(reader, f"{arch}.{key}") == pytest.approx(value), key

    tensors = {t.name: t for t in reader.tensors}
    assert len(reader.tensors) == len(tensors) == n_tensors
    for name, ne in shapes.items():
        assert [int(n) for n in tensors[name].shape] == ne, name
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    has_qk_norm = any(name.endswith("attn_q_norm.weight") for name in tensors)
    assert has_qk_norm == (arch == "qwen3")
    norm = tensors["output_norm.weight"].data
    assert np.all(norm == 1.0)
    emb = np.asarray(tensors["token_embd.weight"].data)
    assert np.isfinite(emb).all() and 0.015 < emb.std() < 0.025


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tokenizer_metadata(tmp_path: Path, arch: str) -> None:
    reader = gguf.GGUFReader(tm.write_tiny_model(tmp_path / "m.gguf", arch))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = LLAMA3_SPECIALS if arch == "llama" else QWEN3_SPECIALS
    assert len(tokens) == len(types) == N_VOCAB[arch]
    assert _field(reader, f"{arch}.vocab_size") == N_VOCAB[arch]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == ("llama-bpe" if arch == "llama" else "qwen2")
    assert len(_field(reader, "tokenizer.ggml.merges")) == N_MERGES

    # 256 distinct single-character byte tokens (GPT-2 byte map), all normal
    assert len(set(tokens[:256])) == 256 and all(len(t) == 1 for t in tokens[:256])
    assert tokens[32] == "Ġ" and tokens[10] == "Ċ" and tokens[ord("a")] == "a"
    assert set(types[: 256 + N_MERGES]) == {1}
    assert tokens[-len(specials) :] == specials
    assert types[-len(specials) :] == [3] * len(specials)

    bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_field(reader, "tokenizer.ggml.eos_token_id")]
    template = _field(reader, "tokenizer.chat_template")
    if arch == "llama":
        assert (bos, eos) == ("<|begin_of_text|>", "<|eot_id|>")
        assert _field(reader, "tokenizer.ggml.add_bos_token") is True
        assert "<|start_header_id|>" in template and "<|eot_id|>" in template
    else:
        assert (bos, eos) == ("<|endoftext|>", "<|im_end|>")
        assert _field(reader, "tokenizer.ggml.add_bos_token") is False
        assert "<|im_start|>" in template and "<|im_end|>" in template


def test_f16_and_tied(tmp_path: Path) -> None:
    path = tm.write_tiny_model(tmp_path / "m.gguf", "qwen3", dtype="f16", tie_embeddings=True)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors
    f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == f16
    assert tensors["blk.0.ffn_down.weight"].tensor_type == f16
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == f32
    assert tensors["output_norm.weight"].tensor_type == f32


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_seed_determines_bytes(tmp_path: Path, arch: str) -> None:
    a = tm.write_tiny_model(tmp_path / "a.gguf", arch, seed=7).read_bytes()
    b = tm.write_tiny_model(tmp_path / "b.gguf", arch, seed=7).read_bytes()
    c = tm.write_tiny_model(tmp_path / "c.gguf", arch, seed=8).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("mistral", {}, "unknown arch 'mistral'"),
        ("llama", {"n_head": 4, "n_head_kv": 3}, "not divisible by n_head_kv=3"),
        ("qwen3", {"n_embd": 60, "n_head": 8, "n_head_kv": 2}, "n_embd=60 is not divisible"),
        ("qwen3", {"head_dim": 15}, "head_dim=15 must be even"),
        ("llama", {"n_layer": 0}, "n_layer must be a positive integer"),
        ("llama", {"dtype": "q4_0"}, "unknown dtype 'q4_0'"),
    ],
)
def test_invalid_arguments(tmp_path: Path, arch: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tm.write_tiny_model(tmp_path / "m.gguf", arch, **kwargs)
    assert not (tmp_path / "m.gguf").exists()


def test_tiny_model_path_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARKV_LOCAL_CACHE", str(tmp_path / "cache"))
    path = tm.tiny_model_path("qwen3", head_dim=32, seed=3)
    assert path.parent == tmp_path / "cache" / "tiny" and path.is_file()
    assert (
        path.read_bytes()
        == tm.write_tiny_model(tmp_path / "ref.gguf", "qwen3", head_dim=32, seed=3).read_bytes()
    )

    stamp = path.stat().st_mtime_ns
    assert tm.tiny_model_path("qwen3", seed=3, head_dim=32) == path
    assert path.stat().st_mtime_ns == stamp  # not rewritten

    others = {
        tm.tiny_model_path("qwen3", head_dim=32, seed=4),
        tm.tiny_model_path("llama", seed=3),
        tm.tiny_model_path("qwen3", head_dim=32, seed=3, dtype="f16"),
    }
    assert path not in others and len(others) == 3
    assert all(p.suffix == ".gguf" for p in path.parent.iterdir())  # no temporary files left

    path.unlink()
    assert tm.tiny_model_path("qwen3", head_dim=32, seed=3) == path and path.is_file()

    with pytest.raises(TypeError):
        tm.tiny_model_path("llama", n_layers=3)
    with pytest.raises(ValueError, match="unknown arch"):
        tm.tiny_model_path("gpt2")


# --- decoding through llama.cpp ------------------------------------------------------------

PROMPT = b"hello world, the tiny model says: 12 + 30 = 42!"
LOAD_CASES = {
    "llama": ("llama", {}),
    # head_dim 32 != n_embd / n_head = 16
    "qwen3": ("qwen3", {"head_dim": 32}),
    "llama-f16-tied": ("llama", {"dtype": "f16", "tie_embeddings": True, "n_layer": 1}),
}


@pytest.fixture(scope="module", params=list(LOAD_CASES))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if Llama is None:
        pytest.skip(NO_LLAMA)
    arch, kwargs = LOAD_CASES[request.param]
    path = tm.write_tiny_model(tmp_path_factory.mktemp("tiny") / "m.gguf", arch, **kwargs)
    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=True)
    yield arch, llm
    llm.close()


@needs_llama
def test_logits(loaded) -> None:
    arch, llm = loaded
    tokens = llm.tokenize(PROMPT)
    assert 15 <= len(tokens) <= 40
    llm.reset()
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    assert llm.n_vocab() == N_VOCAB[arch]
    logits = np.asarray(llm.scores[: llm.n_tokens])
    assert logits.shape == (len(tokens), N_VOCAB[arch])
    assert np.isfinite(logits).all()
    assert (np.ptp(logits, axis=1) > 0).all()  # no row is constant
    assert not np.allclose(logits[0], logits[-1])  # positions differ


@needs_llama
def test_generate_greedy(loaded) -> None:
    _, llm = loaded
    out = llm("hello", max_tokens=8, temperature=0)
    again = llm("hello", max_tokens=8, temperature=0)
    # not <= 8: llama-cpp-python holds back (and does not count against max_tokens) tokens
    # that end in an incomplete UTF-8 sequence, which random byte-level output often does
    assert out["usage"]["completion_tokens"] >= 1
    assert out["choices"][0]["finish_reason"] in {"stop", "length"}
    assert out["choices"][0]["text"] == again["choices"][0]["text"]


@needs_llama
def test_tokenize_round_trip(loaded) -> None:
    arch, llm = loaded
    tokens = llm.tokenize(b"hello world")
    if arch == "llama":
        assert tokens[0] == llm.token_bos()
        tokens = tokens[1:]
    assert llm.detokenize(tokens) == b"hello world"
    assert len(tokens) < len(b"hello world")  # the merges were applied

    text = "héllo wörld, 你好 🙂\n\t\x00end".encode()
    tokens = llm.tokenize(text, add_bos=False)
    assert max(tokens) < 256 + N_MERGES  # bytes and merges only, no control tokens
    assert llm.detokenize(tokens) == text


@needs_llama
def test_chat_completion(loaded) -> None:
    arch, llm = loaded
    specials = LLAMA3_SPECIALS if arch == "llama" else QWEN3_SPECIALS
    assert llm.chat_format == ("llama-3" if arch == "llama" else "chatml")

    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Template(llm.metadata["tokenizer.chat_template"])
    prompt = template.render(
        messages=[{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        bos_token=specials[0],
    )
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    first_special = N_VOCAB[arch] - len(specials)
    control = {llm.detokenize([i], special=True).decode() for i in ids if i >= first_special}
    wanted = set(specials[2:]) if arch == "llama" else {"<|im_start|>", "<|im_end|>"}
    assert wanted <= control  # each template marker is one control token

    out = llm.create_chat_completion(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(out["choices"][0]["message"]["content"], str)
    assert out["choices"][0]["finish_reason"] in {"stop", "length"}
    assert out["usage"]["prompt_tokens"] > 10
