// Fused attention on the CPU: one pass over a layer's quantized LO rows, its spilled S rows (a recall
// pass) and its f16 O rows that dequantizes on read (no f16 copy of the cache), and adds the last
// queries' attention probabilities to the score accumulators on the way (no second QK^T for
// heavy-hitter scores).
//
// Two ggml custom ops: a split-K pass (chunks of keys -> max, sum and weighted V per query and head,
// plus the scored queries' exp(logit - chunk max), so that scoring needs no second exp) and a combine
// pass (output, then score accumulation split over keys). Used for small ubatches (decoding) and for
// recall passes when the pools live in host memory; for decoding over a device's pools where its backend
// implements the two ops (llama_arkv_attn_bind_device; CUDA: ggml-cuda-arkv.cu). LO and S rows are read
// as they are: K . q on q4_0 rows in integers against the query quantized once to q8_0 (the key's
// nibbles unpacked once per GQA group), V rows dequantized with SIMD into a small buffer and added in
// groups of keys. Where the time goes: docs/PROFILE.md.
//
// A third op adds the probabilities of llama.cpp's attention (a prompt's ubatches over host pools) to the
// accumulators in one pass, as the combine pass does. A fourth hands that attention V transposed, as llama.cpp's own
// cache does without flash attention (else llama.cpp copies V transposed, element by element on the CPU).

#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>

// one layer's fused attention. The ops carry a copy in their op_params, after ggml's own custom op params:
// a backend that records graphs (CUDA graphs) compares those, and sees the params change
struct llama_arkv_attn_params {
    float   scale   = 1.0f;
    int32_t n_head  = 0; // query heads
    int32_t n_lo    = 0; // LO rows read (keys 0 .. n_lo-1)
    int32_t n_s     = 0; // S rows read (keys n_lo .. n_lo+n_s-1), of the LO type
    int32_t n_o     = 0; // O rows read (keys n_lo+n_s .. n_lo+n_s+n_o-1, padded: the mask hides the rest)
    int32_t start   = 0; // first column of this layer in the shared mask
    int32_t n_sel   = 0; // the last n_sel queries' attention is added to the accumulators
    int32_t n_chunk = 1; // key chunks of the split-K pass
};

constexpr size_t LLAMA_ARKV_ATTN_PARAMS_OFFS = 32; // bytes into op_params (ggml_custom_op_params takes 24)
static_assert(LLAMA_ARKV_ATTN_PARAMS_OFFS + sizeof(llama_arkv_attn_params) <= GGML_MAX_OP_PARAMS, "op_params too small");

inline const llama_arkv_attn_params * llama_arkv_attn_params_of(const ggml_tensor * op) {
    return (const llama_arkv_attn_params *) ((const char *) op->op_params + LLAMA_ARKV_ATTN_PARAMS_OFFS);
}

// whether the fused path is compiled in (it needs the CPU backend's vector kernels)
bool llama_arkv_attn_cpu_available();

// binds the fused ops (llama_arkv_attn_cpu) to dev's own implementation of them, where its backend has one (CUDA:
// arkv_local/csrc/ggml-cuda-arkv.cu, reached through the registry's "ggml_backend_custom_op_bind"); then pools on
// dev are read there. Returns whether dev runs them (for the shapes its supports_op takes)
bool llama_arkv_attn_bind_device(ggml_backend_dev_t dev);

// one segment of a layer's rows: K and V pools and their score accumulator (F32 [H, cap, 2]: sum p, sum p^2
// over the scored queries and the GQA group; null when nothing is scored)
struct llama_arkv_attn_rows {
    ggml_tensor * k   = nullptr;
    ggml_tensor * v   = nullptr;
    ggml_tensor * acc = nullptr;
};

// attention of q [D, n_head, n_tokens] (F32) over the rows lo (type_q, [D*H, >= n_lo]; null pools when
// n_lo == 0), s (the same type, [D*H, >= n_s]; likewise) and o (F16, [D*H, >= n_o]) under mask (F16 or
// F32, shared by all layers: [n_mask, n_tokens]). Returns F32 [D*n_head, n_tokens], as build_attn_mha.
ggml_tensor * llama_arkv_attn_cpu(ggml_context * ctx, ggml_tensor * q, const llama_arkv_attn_rows & lo,
                                  const llama_arkv_attn_rows & s, const llama_arkv_attn_rows & o, ggml_tensor * mask,
                                  const llama_arkv_attn_params & p);

// the scored queries' attention probabilities probs (F32 [>= n_lo + n_s + n_o, n_sel, n_head], contiguous; keys
// [LO rows | S rows | O rows], later columns ignored) summed over the queries and the GQA group into the
// accumulators of lo, s and o, in one pass (llama.cpp's attention over host pools: a prompt's ubatches). Uses
// p's n_lo, n_s and n_o. A graph node to expand; its F32 [1] result is unused
ggml_tensor * llama_arkv_scores_cpu(ggml_context * ctx, ggml_tensor * probs, const llama_arkv_attn_rows & lo,
                                    const llama_arkv_attn_rows & s, const llama_arkv_attn_rows & o,
                                    const llama_arkv_attn_params & p);

// the rows of parts (each [D*H, n_i], of any type the CPU backend dequantizes; null or empty ones skipped), in order,
// transposed into F16 [n, D*H]: row c holds value c of every row, V^T for llama.cpp's attention without flash attention
ggml_tensor * llama_arkv_rows_t_cpu(ggml_context * ctx, ggml_tensor * const * parts, int n_parts);
