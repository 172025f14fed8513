"""arkv_local.Llama is llama_cpp.Llama over our libllama: same results, clearer errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import arkv_local
from arkv_local import arkv_cpp
from arkv_local.models import model_shape

PROMPT = "The three most common uses of a hash map in a compiler are"
COMMON = dict(n_ctx=512, n_threads=2, n_batch=64, seed=0, logits_all=True, verbose=False)


def test_llama_cpp_is_bound_to_our_library() -> None:
    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    assert loaded.parent == arkv_cpp.LIB_DIR
    assert arkv_cpp.llama_arkv_version().startswith(
        f"arkv_local {arkv_local.__version__} (llama.cpp ".encode())


def test_default_model_is_smollm2(smollm2: Path) -> None:
    h = hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert h == arkv_local.models.SMOLLM2.sha256
    llm = arkv_local.Llama(n_ctx=64, verbose=False)
    assert Path(llm.model_path) == smollm2
    assert llm.metadata["general.architecture"] == "llama"


def test_full_policy_matches_stock_llama_cpp(smollm2: Path) -> None:
    ours = arkv_local.Llama(smollm2, kv_policy="full", **COMMON)
    stock = llama_cpp.Llama(str(smollm2), **COMMON)
    tokens = ours.tokenize(PROMPT.encode())
    assert tokens == stock.tokenize(PROMPT.encode())
    ours.eval(tokens)
    stock.eval(tokens)
    n = len(tokens)
    assert np.isfinite(ours.scores[:n]).all()
    np.testing.assert_array_equal(ours.scores[:n], stock.scores[:n])
    a = ours(PROMPT, max_tokens=48, temperature=0)["choices"][0]["text"]
    b = stock(PROMPT, max_tokens=48, temperature=0)["choices"][0]["text"]
    assert a == b and len(a) > 20


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found: .*nope.gguf"):
        arkv_local.Llama(tmp_path / "nope.gguf")


def test_non_gguf_file_is_named(tmp_path: Path) -> None:
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ValueError, match=r"model.bin is not a GGUF file .*b'PK\\x03\\x04'"):
        arkv_local.Llama(bogus)


def test_unknown_policy_is_named(smollm2: Path) -> None:
    with pytest.raises(ValueError, match="unknown kv_policy 'lru': choose one of full"):
        arkv_local.Llama(smollm2, kv_policy="lru")


@pytest.mark.parametrize("knob, value", [("kv_budget", "2048"), ("kv_budget", 512.5),
                                         ("kv_window", True), ("kv_slack", 64.0),
                                         ("kv_budget_bytes", "1e6"), ("kv_observe", None)])
def test_a_count_that_is_not_an_integer_is_named(smollm2: Path, knob: str, value: object) -> None:
    # before the model loads; a string or a float reached ctypes, or a comparison, unnamed
    with pytest.raises(TypeError, match=f"{knob} must be an integer, got {value!r}"):
        arkv_local.Llama(smollm2, kv_policy="arkv", **{knob: value}, verbose=False)


def test_kv_rotate_and_n_ctx_must_be_what_they_say(smollm2: Path) -> None:
    with pytest.raises(TypeError, match="kv_rotate must be True or False, got 'no'"):
        arkv_local.Llama(smollm2, kv_policy="arkv", kv_rotate="no", verbose=False)
    with pytest.raises(ValueError, match="n_ctx must be a number of tokens >= 0.*got -1"):
        arkv_local.Llama(smollm2, kv_policy="arkv", n_ctx=-1, verbose=False)


def test_a_budget_past_the_window_takes_only_the_windows_memory(smollm2: Path) -> None:
    # kv_budget=65536 with n_ctx=512 reserved 1.4 GiB of which 512 tokens' worth could be used
    shape = model_shape(smollm2)
    slot = shape.f16_slot_bytes * shape.n_layer  # a token in f16, all layers
    big = arkv_local.Llama(smollm2, kv_policy="arkv", n_ctx=512, kv_budget=65536, verbose=False)
    same = arkv_local.Llama(smollm2, kv_policy="arkv", n_ctx=512, kv_budget=512, verbose=False)
    assert big.kv_stats().bytes_budget == same.kv_stats().bytes_budget <= 512 * slot
    for llm in (big, same):
        llm.close()
    by_bytes = arkv_local.Llama(smollm2, kv_policy="arkv", n_ctx=512, kv_budget_bytes=1 << 30,
                                verbose=False)
    assert by_bytes.kv_stats().bytes_budget <= 512 * slot
    by_bytes.close()
    # no n_ctx: positions run to the trained length, which the budget may well hold
    free = arkv_local.Llama(smollm2, kv_policy="arkv", kv_budget=4096, verbose=False)
    assert free.kv_stats().bytes_budget > 4000 * slot
    free.close()


def test_llama_cpp_imported_first_loads_our_library(smollm2: Path) -> None:
    # a drop-in: code that imports llama_cpp before arkv_local (llama-cpp-python installed as
    # pure Python has no library of its own; the package's .pth file points it at ours)
    code = ("import llama_cpp, arkv_local\n"
            f"llm = arkv_local.Llama({str(smollm2)!r}, kv_policy='arkv', kv_budget=256,"
            " verbose=False)\n"
            "print(llm('The capital of France is', max_tokens=4)['usage']['completion_tokens'],"
            " llama_cpp.llama_cpp._lib._name)")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, cwd=smollm2.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    n, lib = run.stdout.split()
    assert int(n) > 0 and Path(lib).resolve().parent == arkv_local.arkv_cpp.LIB_DIR.resolve()


def test_embedding_mode_under_a_policy_names_the_cause(smollm2: Path) -> None:
    with pytest.raises(ValueError, match="embedding=True reads several inputs at once.*"
                                         "kv_policy='full' for embeddings"):
        arkv_local.Llama(smollm2, kv_policy="arkv", embedding=True, verbose=False)
    llm = arkv_local.Llama(smollm2, embedding=True, verbose=False)  # "full": llama_cpp's
    assert len(llm.embed("hello")) == llm.n_embd() or len(llm.embed("hello")[0]) == llm.n_embd()


def test_a_cache_type_under_a_policy_is_refused_not_ignored(smollm2: Path) -> None:
    with pytest.raises(ValueError, match=r"type_k=8 \(q8_0\): under a KV policy.*"
                                         r"kv_quant='q4_0'"):
        arkv_local.Llama(smollm2, kv_policy="arkv", kv_budget=256, type_k=8, verbose=False)
    with pytest.raises(ValueError, match=r"type_v=2 \(q4_0\)"):
        arkv_local.Llama(smollm2, kv_policy="quant", kv_budget=256, type_v=2, verbose=False)
    f16 = llama_cpp.GGML_TYPE_F16  # what the policy's O rows are anyway
    arkv_local.Llama(smollm2, kv_policy="arkv", kv_budget=256, type_k=f16, type_v=f16,
                     verbose=False).close()


def test_from_pretrained_without_network_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="could not fetch .*Q4_K_M.*without network"):
        arkv_local.Llama.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                                         "*Q4_K_M.gguf")


@pytest.mark.parametrize("policy", ["full", "arkv"])
@pytest.mark.parametrize("keep", [2**20, -4096])  # in the header; in the tensor data
def test_truncated_gguf_is_named(smollm2: Path, tmp_path: Path, policy: str, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    data = smollm2.read_bytes()
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"cut.gguf is truncated or corrupt"):
        arkv_local.Llama(cut, kv_policy=policy, verbose=False)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_header_fields_are_gguf_readers(smollm2: Path, arch: str) -> None:
    # the quick header read (scalars only, arrays skipped) against gguf's full reader
    from arkv_local.models import read_gguf, read_scalar_fields
    from arkv_local.tiny_models import tiny_model_path

    for path in (smollm2, tiny_model_path(arch, n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
                                          n_ff=512, n_ctx_train=1024)):
        quick = read_scalar_fields(path)
        full = {k: f.contents() for k, f in read_gguf(path).fields.items()
                if not isinstance(f.contents(), list)}
        full = {k: v for k, v in full.items() if not k.startswith("GGUF.")}
        assert quick.keys() == full.keys() and len(quick) > 10
        assert all(quick[k] == pytest.approx(v) if isinstance(v, float) else quick[k] == v
                   for k, v in full.items())


def test_vocab_only_loads_under_a_policy(smollm2: Path) -> None:
    # a tokenizer-only load (as llama-cpp-python's own tests do): no cache, nothing to manage
    llm = arkv_local.Llama(smollm2, vocab_only=True, kv_policy="arkv", kv_budget=256,
                           verbose=False)
    full = arkv_local.Llama(smollm2, vocab_only=True, verbose=False)
    tokens = llm.tokenize(PROMPT.encode())
    assert tokens == full.tokenize(PROMPT.encode()) and len(tokens) > 5
    assert llm.detokenize(tokens) == full.detokenize(tokens) and PROMPT.encode() in \
        llm.detokenize(tokens)
    assert llm.kv_policy == "arkv"


class OneFileRepo:
    """huggingface_hub.HfFileSystem as seen by from_pretrained: a repo with one GGUF file."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def ls(self, repo_id: str, recursive: bool = False) -> list[str]:
        return [f"{repo_id}/model.gguf"]


def test_from_pretrained_reports_only_transport_failures_as_such(
        smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", OneFileRepo)

    def downloaded(**kwargs: object) -> str:
        return str(smollm2)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", downloaded)

    def refuses(self: arkv_local.Llama, *args: object, **kwargs: object) -> None:
        raise RuntimeError("llama.cpp: unknown model architecture 'mamba9'")

    with monkeypatch.context() as m:  # the download worked, the model does not load
        m.setattr(llama_cpp.Llama, "__init__", refuses)
        with pytest.raises(RuntimeError, match="unknown model architecture 'mamba9'"):
            arkv_local.Llama.from_pretrained("org/repo", "*.gguf", verbose=False)
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: str(bad))
    with pytest.raises(ValueError, match="model.gguf is not a GGUF file"):
        arkv_local.Llama.from_pretrained("org/repo", "*.gguf", kv_policy="arkv")
    # a loaded model: the Llama's own arguments reach it
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", downloaded)
    llm = arkv_local.Llama.from_pretrained("org/repo", "*.gguf", kv_policy="arkv",
                                           kv_budget=256, n_ctx=512, verbose=False)
    assert llm.kv_policy == "arkv" and llm.n_ctx() == 512 and Path(llm.model_path) == smollm2
    # code that swaps llama_cpp.Llama for ours (a common retrofit) still downloads once
    with monkeypatch.context() as m:
        m.setattr(llama_cpp, "Llama", arkv_local.Llama)
        llm = arkv_local.Llama.from_pretrained("org/repo", "*.gguf", kv_policy="window",
                                               kv_budget=128, verbose=False)
        assert llm.kv_policy == "window"

    def unreachable(**kwargs: object) -> str:
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ConnectionError, match=r"could not fetch '\*.gguf' .*'org/repo' "
                                              r"\(OSError: .*Network is unreachable"):
        arkv_local.Llama.from_pretrained("org/repo", "*.gguf")


@pytest.mark.parametrize("policy", ["full", "arkv"])
def test_a_replaced_sampler_is_freed_without_the_cycle_collector(smollm2: Path,
                                                                 policy: str) -> None:
    """llama_cpp's samplers are reference cycles (a custom sampler and its callback's closure;
    the chain and its exit stack): left to Python's rare full collection, each generation's
    sampler and its C chain pile up over a long chat (the soak's RSS slope)."""
    import gc
    import weakref

    budget = {"kv_budget": 256} if policy != "full" else {}
    llm = arkv_local.Llama(str(smollm2), kv_policy=policy, n_ctx=512, verbose=False, **budget)
    bias = {llm.token_eos(): -1.0}  # a logit bias makes a custom sampler
    was = gc.isenabled()
    gc.disable()
    try:
        llm.create_completion("One, two,", max_tokens=3, logit_bias=bias)
        chain = weakref.ref(llm._sampler)
        custom = weakref.ref(llm._sampler.custom_samplers[0][1])
        llm.create_completion("Red, green,", max_tokens=3, logit_bias=bias)
        assert chain() is None and custom() is None
        llm.sample()  # the sampler the last generation left is still the one sample() uses
    finally:
        if was:
            gc.enable()
    llm.close()


def test_a_prompt_ends_on_the_same_logits_whatever_the_cache_held(smollm2: Path) -> None:
    """A greedy answer must not depend on the prompt cache: read fresh, after a prompt that
    shares its start, or after itself (llama_cpp then re-reads its last token alone), a prompt
    ends on the stock f16 cache's logits while nothing is quantized (small chunks used to go
    through the fused decode kernel: the server's two concurrent chats answered differently)."""
    knobs = dict(n_ctx=512, n_threads=2, seed=0, verbose=False)
    stock = llama_cpp.Llama(str(smollm2), **knobs)
    llm = arkv_local.Llama(str(smollm2), kv_policy="arkv", kv_budget=256, kv_rotate=False,
                           **knobs)

    def first_logits(model: llama_cpp.Llama, text: str) -> np.ndarray:
        gen = model.generate(model.tokenize(text.encode()), temp=0.0)
        next(gen)
        gen.close()
        row = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(model.n_vocab(),)).copy()

    question, other = "Name a color of the sky.", "Name the capital of France."
    want = first_logits(stock, question)
    fresh = first_logits(llm, question)
    first_logits(llm, other)  # shares the question's first word
    after_other = first_logits(llm, question)
    again = first_logits(llm, question)  # the whole prompt cached: its last token alone
    assert llm.kv_stats().layers[0].n_q == 0  # nothing quantized: the stock logits are exact
    for got in (fresh, after_other, again):
        np.testing.assert_array_equal(got, want)


SPECULATIVE = """
import sys
import arkv_local
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
prompt = "Count in words, separated by commas: one, two, three, four, five, six, seven,"
read = arkv_local.Llama.eval
batches = []  # evals of a sampled token and its drafts after rows were spilled
def counted(self, tokens):
    if 1 < len(tokens) <= 5 and self._tailor and self._tailor.spilled():
        batches.append(len(tokens))
    return read(self, tokens)
arkv_local.Llama.eval = counted
for kw in (dict(kv_policy="full"), dict(kv_policy="arkv", kv_budget=128)):
    llm = arkv_local.Llama(sys.argv[1], n_ctx=1024, verbose=False,
                           draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4), **kw)
    r = llm(prompt, max_tokens=160, temperature=0.0)
    stats = llm.kv_stats() if llm._tailor else None
    print(r["usage"]["completion_tokens"], stats is None or stats.bytes_used <= stats.bytes_budget)
print(len(batches))
"""


def test_speculative_decoding_under_a_policy(smollm2: Path) -> None:
    """llama_cpp's draft models (prompt lookup): generate reads the sampled token and its drafts
    in one eval and samples each from that batch's logits; under a policy that eval is no
    prompt, not split by a recall pass (sampling from a row outside the last batch aborted the
    process: GGML_ASSERT(logits != nullptr))."""
    run = subprocess.run([sys.executable, "-c", SPECULATIVE, str(smollm2)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    full, tight, batches = run.stdout.split("\n")[:3]
    assert full == tight == "160 True"
    assert int(batches) > 0  # drafts were read over a cache with spilled rows


def test_one_token_is_decoded_as_a_decode_unless_generate_reads_it_as_its_prompt(
        smollm2: Path) -> None:
    """The fused decode kernel reads one token at a time (generate's sampled tokens, a loop of
    eval() of one token); every longer eval, and generate's prompt even of one token, is a
    prompt (llama.cpp's attention)."""
    from itertools import islice

    llm = arkv_local.Llama(str(smollm2), kv_policy="arkv", kv_budget=256, n_ctx=512,
                           verbose=False)
    kv, calls = llm._tailor.kv, []
    set_prompt = kv.set_prompt
    kv.set_prompt = lambda on: (calls.append(on), set_prompt(on))  # type: ignore[method-assign]
    prompt = llm.tokenize(b"One, two, three,")
    list(islice(llm.generate(prompt, temp=0.0), 4))
    assert calls == [True, False, False, False]  # the prompt, then 3 of the 4 tokens sampled
    calls.clear()
    llm.eval([llm.sample(temp=0.0)])
    llm.eval(prompt[1:3])
    assert calls == [False, True]
    calls.clear()
    next(llm.generate(prompt, temp=0.0))  # a prefix hit: its last token read again, alone
    assert calls == [True]


def test_tailoring_leaves_no_reference_cycles(smollm2: Path) -> None:
    """Every plan hands its arrays to C++ by pointer: numpy's data_as() makes each pointer a
    reference cycle (CPython's ctypes.cast, bpo-12836) that keeps its array alive until Python's
    rare full collection (the soak's heap grew by them). Reading a prompt past the budget, with
    its plans and recall, leaves nothing for the cycle collector."""
    import gc

    llm = arkv_local.Llama(str(smollm2), kv_policy="arkv", kv_budget=128, n_ctx=1024,
                           verbose=False)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 60)
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        llm.eval(tokens)
        assert llm.kv_stats().n_tailorings > 1 and llm.kv_stats().n_recalls == 1
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()
    llm.close()
