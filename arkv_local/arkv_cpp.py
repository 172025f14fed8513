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


# struct llama_arkv_params {
#     uint64_t       budget_bytes;
#     uint32_t       n_o_init;
#     enum ggml_type type_q;
#     bool           rotate;
#     uint32_t       n_score_queries;
#     enum llama_arkv_attn attn;
#     uint32_t       cap_s;
#     const char *   spill_dir;
# };
class llama_arkv_params(ctypes.Structure):
    """Parameters of the tri-state KV memory (see llama-arkv.h)."""

    _fields_ = [
        ("budget_bytes", ctypes.c_uint64),
        ("n_o_init", ctypes.c_uint32),
        ("type_q", ctypes.c_int),
        ("rotate", ctypes.c_bool),
        ("n_score_queries", ctypes.c_uint32),
        ("attn", ctypes.c_int),
        ("cap_s", ctypes.c_uint32),
        ("spill_dir", ctypes.c_char_p),
    ]


# struct llama_arkv_layer_info {
#     uint32_t cap_o; uint32_t cap_q; uint32_t n_o; uint32_t n_q;
#     uint64_t bytes_alloc; uint64_t bytes_used;
#     uint32_t cap_s; uint32_t n_s; uint64_t bytes_spill;
# };
class llama_arkv_layer_info(ctypes.Structure):
    """One layer's pools: capacities, slots in use and bytes."""

    _fields_ = [
        ("cap_o", ctypes.c_uint32),
        ("cap_q", ctypes.c_uint32),
        ("n_o", ctypes.c_uint32),
        ("n_q", ctypes.c_uint32),
        ("bytes_alloc", ctypes.c_uint64),
        ("bytes_used", ctypes.c_uint64),
        ("cap_s", ctypes.c_uint32),
        ("n_s", ctypes.c_uint32),
        ("bytes_spill", ctypes.c_uint64),
    ]


# struct llama_arkv_layer_plan {
#     uint32_t cap_o; uint32_t n_o; uint32_t n_q; uint32_t n_s;
#     const int32_t * o_src; const uint8_t * o_from; const int32_t * q_src; const uint8_t * q_from;
#     const int32_t * s_src; const uint8_t * s_from;
# };
class llama_arkv_layer_plan(ctypes.Structure):
    """One layer's next layout: the current rows each new slot takes, per KV head."""

    _fields_ = [
        ("cap_o", ctypes.c_uint32),
        ("n_o", ctypes.c_uint32),
        ("n_q", ctypes.c_uint32),
        ("n_s", ctypes.c_uint32),
        ("o_src", ctypes.POINTER(ctypes.c_int32)),
        ("o_from", ctypes.POINTER(ctypes.c_uint8)),
        ("q_src", ctypes.POINTER(ctypes.c_int32)),
        ("q_from", ctypes.POINTER(ctypes.c_uint8)),
        ("s_src", ctypes.POINTER(ctypes.c_int32)),
        ("s_from", ctypes.POINTER(ctypes.c_uint8)),
    ]


_ctx_p = ctypes.c_void_p  # struct llama_context *
_f32_p = ctypes.POINTER(ctypes.c_float)
_i32_p = ctypes.POINTER(ctypes.c_int32)


# LLAMA_API struct llama_arkv_params llama_arkv_default_params(void);
@ctypes_function("llama_arkv_default_params", [], llama_arkv_params)
def llama_arkv_default_params() -> llama_arkv_params: ...


# LLAMA_API void llama_arkv_arm(const struct llama_arkv_params * params);
@ctypes_function("llama_arkv_arm", [ctypes.POINTER(llama_arkv_params)], None)
def llama_arkv_arm(params: ctypes._Pointer | None, /) -> None: ...


# LLAMA_API const char * llama_arkv_last_error(void);
@ctypes_function("llama_arkv_last_error", [], ctypes.c_char_p)
def llama_arkv_last_error() -> bytes: ...


# LLAMA_API void llama_arkv_clear_error(void);
@ctypes_function("llama_arkv_clear_error", [], None)
def llama_arkv_clear_error() -> None: ...


# LLAMA_API int32_t llama_arkv_n_layer(const struct llama_context * ctx);
@ctypes_function("llama_arkv_n_layer", [_ctx_p], ctypes.c_int32)
def llama_arkv_n_layer(ctx: int, /) -> int: ...


# LLAMA_API int32_t llama_arkv_n_head_kv(const struct llama_context * ctx);
@ctypes_function("llama_arkv_n_head_kv", [_ctx_p], ctypes.c_int32)
def llama_arkv_n_head_kv(ctx: int, /) -> int: ...


# LLAMA_API int32_t llama_arkv_head_dim(const struct llama_context * ctx);
@ctypes_function("llama_arkv_head_dim", [_ctx_p], ctypes.c_int32)
def llama_arkv_head_dim(ctx: int, /) -> int: ...


# LLAMA_API uint64_t llama_arkv_slot_bytes(const struct llama_context * ctx, bool quantized);
@ctypes_function("llama_arkv_slot_bytes", [_ctx_p, ctypes.c_bool], ctypes.c_uint64)
def llama_arkv_slot_bytes(ctx: int, quantized: bool, /) -> int: ...


# LLAMA_API uint64_t llama_arkv_compute_bytes(const struct llama_context * ctx);
@ctypes_function("llama_arkv_compute_bytes", [_ctx_p], ctypes.c_uint64)
def llama_arkv_compute_bytes(ctx: int, /) -> int: ...


# LLAMA_API uint32_t llama_arkv_cap_q(const struct llama_context * ctx, uint32_t cap_o);
@ctypes_function("llama_arkv_cap_q", [_ctx_p, ctypes.c_uint32], ctypes.c_uint32)
def llama_arkv_cap_q(ctx: int, cap_o: int, /) -> int: ...


# LLAMA_API int32_t llama_arkv_free_slots(const struct llama_context * ctx);
@ctypes_function("llama_arkv_free_slots", [_ctx_p], ctypes.c_int32)
def llama_arkv_free_slots(ctx: int, /) -> int: ...


# LLAMA_API bool llama_arkv_cut_tail(struct llama_context * ctx, int32_t p0);
@ctypes_function("llama_arkv_cut_tail", [_ctx_p, ctypes.c_int32], ctypes.c_bool)
def llama_arkv_cut_tail(ctx: int, p0: int, /) -> bool: ...


# LLAMA_API bool llama_arkv_get_pool_extent(const struct llama_context * ctx, int32_t i, uint64_t * out);
@ctypes_function("llama_arkv_get_pool_extent", [_ctx_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_uint64)], ctypes.c_bool)
def llama_arkv_get_pool_extent(ctx: int, i: int, out: ctypes._Pointer, /) -> bool: ...


# LLAMA_API void llama_arkv_get_layers(const struct llama_context * ctx, struct llama_arkv_layer_info * out);
@ctypes_function("llama_arkv_get_layers", [_ctx_p, ctypes.POINTER(llama_arkv_layer_info)], None)
def llama_arkv_get_layers(ctx: int, out: ctypes.Array, /) -> None: ...


# LLAMA_API void llama_arkv_get_positions(const struct llama_context * ctx, int32_t * pos_o,
#         int32_t * pos_q, int32_t * pos_s);
@ctypes_function("llama_arkv_get_positions", [_ctx_p, _i32_p, _i32_p, _i32_p], None)
def llama_arkv_get_positions(ctx: int, pos_o: ctypes._Pointer, pos_q: ctypes._Pointer,
                             pos_s: ctypes._Pointer, /) -> None: ...


# LLAMA_API uint32_t llama_arkv_get_scores(const struct llama_context * ctx,
#         float * sum_o, float * sum_sq_o, float * sum_q, float * sum_sq_q,
#         float * sum_s, float * sum_sq_s);
@ctypes_function("llama_arkv_get_scores", [_ctx_p] + [_f32_p] * 6, ctypes.c_uint32)
def llama_arkv_get_scores(ctx: int, sum_o: ctypes._Pointer, sum_sq_o: ctypes._Pointer,
                          sum_q: ctypes._Pointer, sum_sq_q: ctypes._Pointer,
                          sum_s: ctypes._Pointer, sum_sq_s: ctypes._Pointer, /) -> int: ...


# LLAMA_API int32_t llama_arkv_apply_plan(struct llama_context * ctx);
@ctypes_function("llama_arkv_apply_plan", [_ctx_p], ctypes.c_int32)
def llama_arkv_apply_plan(ctx: int, /) -> int: ...


# LLAMA_API void llama_arkv_set_recall(struct llama_context * ctx, bool on);
@ctypes_function("llama_arkv_set_recall", [_ctx_p, ctypes.c_bool], None)
def llama_arkv_set_recall(ctx: int, on: bool, /) -> None: ...


# LLAMA_API void llama_arkv_set_prompt(struct llama_context * ctx, bool on);
@ctypes_function("llama_arkv_set_prompt", [_ctx_p, ctypes.c_bool], None)
def llama_arkv_set_prompt(ctx: int, on: bool, /) -> None: ...


# LLAMA_API int32_t llama_arkv_submit_plan(struct llama_context * ctx, const struct llama_arkv_layer_plan * plans);
@ctypes_function("llama_arkv_submit_plan", [_ctx_p, ctypes.POINTER(llama_arkv_layer_plan)], ctypes.c_int32)
def llama_arkv_submit_plan(ctx: int, plans: ctypes.Array, /) -> int: ...


# LLAMA_API void llama_arkv_request_stats(struct llama_context * ctx);
@ctypes_function("llama_arkv_request_stats", [_ctx_p], None)
def llama_arkv_request_stats(ctx: int, /) -> None: ...


# LLAMA_API bool llama_arkv_get_stats(const struct llama_context * ctx, float * out);
@ctypes_function("llama_arkv_get_stats", [_ctx_p, _f32_p], ctypes.c_bool)
def llama_arkv_get_stats(ctx: int, out: ctypes._Pointer, /) -> bool: ...
