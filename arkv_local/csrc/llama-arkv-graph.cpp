// Tri-state KV memory (ARKV): the graph side. The attention input (idxs of new rows, the shared mask,
// rotations), the store of new K/V into O, the choice of attention path per layer and ubatch
// (choose_attn_path), the paths themselves, heavy-hitter scores and ARKV's prefill statistics.

#include "llama-kv-cache-arkv.h"
#include "llama-arkv-attn-cpu.h"

#include "llama-batch.h"
#include "llama-graph.h"
#include "llama-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

// ggml ops used, all available on CPU, CUDA and Metal:
//   set_rows (F32 -> F32 / F16 / Q4_0 / Q4_1 / Q8_0), get_rows (F16 / quant -> F32, I32 idxs), pad (F32),
//   cast (F32 -> F16), concat (F16, F32), cont, mul_mat, soft_max_ext, sqr, sum_rows, sum, add, sub, mul,
//   div, scale, scale_bias, log, clamp, cpy (F32)
// and, for pools in host memory only, the two custom ops of the fused decode attention, the scores op of a
// prompt's ubatches and the op that hands them V transposed without flash attention (llama-arkv-attn-cpu.h);
// the two fused ops also on a device whose backend implements them (CUDA: ggml-cuda-arkv.cu; Metal: not yet)

static constexpr uint32_t ARKV_N_KV_PAD = 256; // rows read are padded: graphs can be reused, ggml-cuda's FA vector kernel needs it
static constexpr uint32_t ARKV_DEQ_ALIGN = 16; // rows the dequant path reads: llamafile's tinyBLAS (CPU) takes only
                                              // products whose key count is a multiple of 16 (KQV) or 4 (KQ)
static constexpr int64_t ARKV_DECODE_MAX_TOKENS = 8; // larger ubatches amortize dequantizing into f16

// whether a ubatch is read as decoded tokens (the fused kernel or the segments path), not as a prompt's
static bool arkv_decoding(int64_t n_tokens, bool prompt) {
    return n_tokens <= ARKV_DECODE_MAX_TOKENS && !prompt;
}

// a pool's padded row count for n rows in use
static uint32_t arkv_pad_rows(uint32_t n, uint32_t cap) {
    return std::min(cap, std::max(n, GGML_PAD(n, ARKV_N_KV_PAD)));
}

//
// graph
//

bool llama_kv_cache_arkv::layout::operator==(const layout & other) const {
    if (n_old != other.n_old || n_mask != other.n_mask || stats != other.stats || recall != other.recall || prompt != other.prompt ||
        pools != other.pools ||
        views.size() != other.views.size()) {
        return false;
    }
    for (size_t i = 0; i < views.size(); ++i) {
        const auto & a = views[i];
        const auto & b = other.views[i];
        if (a.n_lo != b.n_lo || a.n_s != b.n_s || a.n_o_pad != b.n_o_pad || a.start != b.start) {
            return false;
        }
    }
    return true;
}

// layer l reads [LO rows | S rows (recall passes) | O rows (old, then the ubatch's new ones, then padding) | the
// dequant path's tail].
// All layers share one mask [n_mask, n_tokens]: columns < n_old are visible, then the new tokens (causal),
// then masked. Layer l uses the window starting at start_l = n_old - (n_q_l + n_s_l + n_o_old_l); while
// tokens are appended, start_l and the window width stay constant, so the graph can be reused.
llama_kv_cache_arkv::layout llama_kv_cache_arkv::make_layout(uint32_t n_tokens, bool worst_case) const {
    layout lay;
    lay.pools = pools_generation;
    lay.recall = recall && !worst_case;
    lay.prompt = prompt;
    lay.views.resize(layers.size());
    // whether a layer may take the dequant path (choose_attn_path), which reads n_tail more rows
    const bool dequant = worst_case || !arkv_decoding(n_tokens, prompt) || lay.recall ||
                         params.attn == LLAMA_ARKV_ATTN_DEQUANT;
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & l = layers[i];
        auto & v = lay.views[i];
        v.n_lo     = worst_case ? l.cap_lo : l.n_lo;
        v.n_lo_pad = arkv_pad_rows(v.n_lo, l.cap_lo);
        v.n_s      = lay.recall ? l.n_s : 0;
        v.n_o     = worst_case ? l.cap_o : l.n_o;
        v.n_o_pad = worst_case ? l.cap_o : arkv_pad_rows(l.n_o, l.cap_o);
        if (dequant && v.n_lo + v.n_s > 0) {
            const uint32_t n = v.n_lo + v.n_s + v.n_o_pad;
            v.n_tail = GGML_PAD(n, ARKV_DEQ_ALIGN) - n;
            if (v.n_tail > l.cap_o) {
                v.n_tail = 0; // the tail repeats the O pool's first rows: a pool this small reads unaligned
            }
        }
        const uint32_t n_o_old = v.n_o >= n_tokens ? v.n_o - n_tokens : 0;
        lay.n_old = std::max(lay.n_old, v.n_lo + v.n_s + n_o_old);
        lay.n_lo_max   = std::max(lay.n_lo_max, v.n_lo);
        if (v.n_lo + v.n_s > 0) { // the dequant path gathers each part and places it (build_read_dequant)
            lay.n_deq_max = std::max(lay.n_deq_max, v.n_lo + v.n_s + v.n_o_pad + v.n_tail);
        }
        lay.lo_pad_max = std::max(lay.lo_pad_max, v.n_lo_pad - v.n_lo);
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        auto & v = lay.views[i];
        const uint32_t n_o_old = v.n_o >= n_tokens ? v.n_o - n_tokens : 0;
        v.start = lay.n_old - (v.n_lo + v.n_s + n_o_old);
        lay.n_mask = std::max(lay.n_mask, v.start + v.n_lo + v.n_s + v.n_o_pad + v.n_tail);
    }
    return lay;
}

void llama_kv_cache_arkv::apply_ubatch(const llama_ubatch & ubatch) {
    for (auto & l : layers) {
        GGML_ASSERT(l.n_o + ubatch.n_tokens <= l.cap_o);
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            std::fill_n(l.pos_o.begin() + (size_t) (l.n_o + i)*n_head_kv_, n_head_kv_, ubatch.pos[i]);
        }
        l.n_o += ubatch.n_tokens;
    }
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        pos_max = std::max(pos_max, ubatch.pos[i]);
    }
    n_scored += recall ? ubatch.n_tokens : std::min(ubatch.n_tokens, params.n_score_queries);
}

ggml_tensor * llama_kv_cache_arkv::build_input_rot(ggml_context * ctx, int64_t n) const {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);
    ggml_set_input(t);
    ggml_set_name(t, "arkv_inp_rot");
    return t;
}

// orthonormal Sylvester Walsh-Hadamard matrix, as llama.cpp's (the CPU/CUDA fast paths assume exactly it)
std::vector<float> llama_kv_cache_arkv::hadamard(int64_t n) {
    std::vector<float> data(n*n);
    data[0] = 1.0f/sqrtf(n);
    for (int64_t s = 1; s < n; s *= 2) {
        for (int64_t i = 0; i < s; i++) {
            for (int64_t j = 0; j < s; j++) {
                const float val = data[i*n + j];
                data[(i + s)*n + j]       =  val;
                data[i*n + (j + s)]       =  val;
                data[(i + s)*n + (j + s)] = -val;
            }
        }
    }
    return data;
}

int64_t llama_kv_cache_arkv::rot_k_size() const {
    int64_t nrot = 64;
    while (head_dim_ % (2*nrot) == 0) {
        nrot *= 2;
    }
    return nrot;
}

void llama_kv_cache_arkv::set_input_rot(ggml_tensor * dst) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const std::vector<float> h = hadamard(dst->ne[0]);
    memcpy(dst->data, h.data(), h.size()*sizeof(float));
}

// per layer, the O rows the ubatch's tokens go to: I64 [n_tokens, n_layer]
void llama_kv_cache_arkv::set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    int64_t * data = (int64_t *) dst->data;
    const uint32_t n = ubatch->n_tokens;
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const uint32_t first = layers[ikv].n_o - n; // apply() already counted them
        for (uint32_t i = 0; i < n; ++i) {
            data[ikv*n + i] = first + i;
        }
    }
}

void llama_kv_cache_arkv::set_input_kq_mask(ggml_tensor * dst, const llama_ubatch * ubatch, const layout & lay) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const uint32_t n = ubatch->n_tokens;
    const int64_t n_mask = dst->ne[0];
    GGML_ASSERT(n_mask == lay.n_mask && dst->ne[1] == n);
    std::vector<float> row(n_mask);
    for (uint32_t t = 0; t < n; ++t) {
        for (int64_t j = 0; j < n_mask; ++j) {
            float v = -INFINITY;
            if (j < lay.n_old) {
                v = 0.0f;
            } else if (j < lay.n_old + n) {
                v = ubatch->pos[j - lay.n_old] <= ubatch->pos[t] ? 0.0f : -INFINITY;
            }
            row[j] = v;
        }
        if (dst->type == GGML_TYPE_F16) {
            ggml_fp32_to_fp16_row(row.data(), (ggml_fp16_t *) dst->data + t*n_mask, n_mask);
        } else {
            memcpy((float *) dst->data + t*n_mask, row.data(), n_mask*sizeof(float));
        }
    }
}

// the LO rows' mask of the segments path: F16 [n_lo_max + lo_pad_max, n_tokens]; layer l reads the window
// starting at n_lo_max - n_q_l: its n_q_l rows visible (all older than the ubatch), its padding hidden
void llama_kv_cache_arkv::set_input_q_mask(ggml_tensor * dst, const layout & lay) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_F16);
    GGML_ASSERT(dst->ne[0] == (int64_t) lay.n_lo_max + lay.lo_pad_max);
    std::vector<ggml_fp16_t> row(dst->ne[0]);
    for (int64_t j = 0; j < dst->ne[0]; ++j) {
        row[j] = ggml_fp32_to_fp16(j < lay.n_lo_max ? 0.0f : -INFINITY);
    }
    for (int64_t t = 0; t < dst->ne[1]; ++t) {
        memcpy((ggml_fp16_t *) dst->data + t*dst->ne[0], row.data(), row.size()*sizeof(ggml_fp16_t));
    }
}

// ARKV's prefill statistics of one layer, from p [n_kv, n_sel, n_head] (the observation window's
// attention) restricted to the n_nw keys before the window, which lead every layer's key order:
// entropy -sum p log(p + 1e-10); variance sum over heads and keys of the variance over queries;
// kurtosis sum over heads and keys of m4 / max(m2, eps)^2 (Pearson, moments over queries)
void llama_kv_cache_arkv::build_stats(ggml_context * ctx0, ggml_cgraph * gf, const layer & l, ggml_tensor * p,
                                      int64_t n_nw) const {
    if (n_nw <= 0) {
        return;
    }
    const int64_t n_sel  = p->ne[1];
    const int64_t n_head = p->ne[2];
    ggml_tensor * pw = ggml_cont(ctx0, ggml_view_3d(ctx0, p, n_nw, n_sel, n_head, p->nb[1], p->nb[2], 0));
    ggml_tensor * ent = ggml_scale(ctx0, ggml_sum(ctx0, ggml_mul(ctx0, pw, ggml_log(ctx0, ggml_scale_bias(ctx0, pw, 1.0f, 1e-10f)))), -1.0f);

    ggml_tensor * pt   = ggml_cont(ctx0, ggml_permute(ctx0, pw, 1, 0, 2, 3));       // [n_sel, n_nw, n_head]
    ggml_tensor * mean = ggml_scale(ctx0, ggml_sum_rows(ctx0, pt), 1.0f/n_sel);     // [1, n_nw, n_head]
    ggml_tensor * d2   = ggml_sqr(ctx0, ggml_sub(ctx0, pt, mean));
    ggml_tensor * m2   = ggml_scale(ctx0, ggml_sum_rows(ctx0, d2), 1.0f/n_sel);
    ggml_tensor * m4   = ggml_scale(ctx0, ggml_sum_rows(ctx0, ggml_sqr(ctx0, d2)), 1.0f/n_sel);
    ggml_tensor * var  = ggml_sum(ctx0, m2);
    ggml_tensor * kur  = ggml_sum(ctx0, ggml_div(ctx0, m4, ggml_sqr(ctx0, ggml_clamp(ctx0, m2, 1e-15f, INFINITY))));

    ggml_tensor * st = ggml_concat(ctx0, ggml_concat(ctx0, ent, var, 0), kur, 0);
    ggml_build_forward_expand(gf, ggml_cpy(ctx0, st, l.stats));
}

// which attention a layer builds for a ubatch
llama_kv_cache_arkv::attn_path llama_kv_cache_arkv::choose_attn_path(const llm_graph_context & gctx, const layer & l,
                                                                     const view & v, int64_t n_tokens,
                                                                     const layout & lay) const {
    // a prompt's ubatches all take the prefill paths, whatever their size: its logits are the same however it
    // was split into ubatches (and bit-exact with the stock cache while nothing is quantized)
    const bool decode = arkv_decoding(n_tokens, lay.prompt);
    // the fused kernel reads pools in host memory where they lie. Decoding, also over O rows alone: it reads each
    // f16 key once per GQA group and scores as it goes (llama.cpp's attention reads it once per query head, then
    // scores again). A recall pass: the spilled rows are read in place, no f16 copy of them in the compute buffer.
    // On a device that runs it: decoding over LO and O rows (over O rows alone, llama.cpp's attention is bit-exact
    // with the stock cache; the spill is in host memory)
    const bool host  = ggml_backend_buffer_is_host(l.k_arena->buffer);
    const bool fused = !lay.stats && !gctx.hparams.attn_soft_cap && params.attn == LLAMA_ARKV_ATTN_AUTO &&
                       llama_arkv_attn_cpu_available() &&
                       (host ? (v.n_s > 0 ? lay.recall : decode) : l.dev_fused && decode && v.n_s == 0 && v.n_lo > 0);
    if (fused) {
        return ATTN_FUSED;
    }
    if (v.n_lo == 0 && v.n_s == 0) {
        // only O rows, otherwise (prefill, device pools, attn "dequant"): llama.cpp's attention, bit-exact with
        // the stock cache
        return ATTN_STOCK;
    }
    if (!decode || lay.stats || v.n_s > 0 || gctx.hparams.attn_soft_cap ||
        params.attn == LLAMA_ARKV_ATTN_DEQUANT) {
        // prefill amortizes dequantizing over many queries; statistics need the full softmax; a recall pass
        // from device pools reads the spilled rows once, from host memory
        return ATTN_DEQUANT;
    }
    return ATTN_SEGMENTS;
}

// kv_spill="disk": after a layer's reads or writes of its spilled rows, their pages of the file leave the process
void llama_kv_cache_arkv::release_spill_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(dst);
    GGML_UNUSED(nth);
    const auto * r = (const spill_release *) userdata;
    const layer & l = r->kv->layers[r->ikv];
    if (ith == 0) {
        r->kv->release_spill_pages(l.k_s->data, ggml_nbytes(l.k_s));
        r->kv->release_spill_pages(l.v_s->data, ggml_nbytes(l.v_s));
    }
}

ggml_tensor * llama_kv_cache_arkv::build_release_spill(ggml_context * ctx0, ggml_tensor * after, uint32_t ikv) const {
    ggml_tensor * args[1] = { after };
    return ggml_custom_4d(ctx0, GGML_TYPE_F32, 1, 1, 1, 1, args, 1, release_spill_op, 1,
                          (void *) &spill_releases[ikv]);
}

// store the ubatch's K/V into the O pool; returns the set_rows results (the pools, with a graph edge)
void llama_kv_cache_arkv::build_store(ggml_context * ctx0, ggml_cgraph * gf, const llm_graph_input_attn_kv_arkv * inp,
                                      const layer & l, uint32_t ikv, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                      ggml_tensor ** k_o, ggml_tensor ** v_o) const {
    const int64_t n_tokens = k_cur->ne[2];
    ggml_tensor * idxs = ggml_view_1d(ctx0, inp->near.k_idxs, n_tokens, ikv*n_tokens*ggml_element_size(inp->near.k_idxs));
    for (int i = 0; i < 2; ++i) {
        ggml_tensor * cur = i == 0 ? k_cur : v_cur;
        GGML_ASSERT(ggml_row_size(cur->type, head_dim_) == cur->nb[1]);
        ggml_tensor * rows = ggml_view_2d(ctx0, cur, (int64_t) head_dim_*n_head_kv_, n_tokens, cur->nb[2], 0);
        ggml_tensor * stored = ggml_set_rows(ctx0, i == 0 ? l.k_o : l.v_o, rows, idxs);
        ggml_build_forward_expand(gf, stored);
        *(i == 0 ? k_o : v_o) = stored;
    }
}

// n rows of a pool (or of the set_rows result that wrote it) as [D, n, H]: the layout attention reads
ggml_tensor * llama_kv_cache_arkv::pool_heads(ggml_context * ctx0, ggml_tensor * pool, int64_t n) const {
    ggml_tensor * t = ggml_view_3d(ctx0, pool, head_dim_, n_head_kv_, n, ggml_row_size(pool->type, head_dim_), pool->nb[1], 0);
    return ggml_permute(ctx0, t, 0, 2, 1, 3);
}

// [LO rows dequantized to f16 | S rows dequantized (recall passes) | O rows | tail] as [D, H, n_kv], for llama.cpp's
// attention. The tail repeats O's first rows, hidden by the mask: finite rows of weight 0 that align n_kv. Each
// part is gathered to f32 and placed with set_rows (threaded by rows on the CPU; ggml-cpu's f16 concat is one
// thread, element by element)
ggml_tensor * llama_kv_cache_arkv::build_read_dequant(ggml_context * ctx0, const llm_graph_input_attn_kv_arkv * inp,
                                                      const view & v, ggml_tensor * pool_o, ggml_tensor * pool_lo,
                                                      ggml_tensor * pool_s) const {
    const int64_t D = head_dim_;
    const int64_t H = n_head_kv_;
    if (v.n_lo == 0 && v.n_s == 0) {
        return ggml_view_3d(ctx0, pool_o, D, H, v.n_o_pad, ggml_row_size(pool_o->type, D), pool_o->nb[1], 0);
    }
    const int64_t n_kv = v.n_lo + v.n_s + v.n_o_pad + v.n_tail;
    ggml_tensor * arange = inp->near.lo_arange;
    GGML_ASSERT(arange->ne[0] >= n_kv);
    ggml_tensor * kv = ggml_new_tensor_2d(ctx0, GGML_TYPE_F16, D*H, n_kv);
    int64_t row = 0;
    auto place = [&](ggml_tensor * pool, int64_t n) { // the pool's first n rows, at rows [row, row + n)
        if (n == 0) {
            return;
        }
        ggml_tensor * rows = ggml_get_rows(ctx0, ggml_view_2d(ctx0, pool, D*H, n, pool->nb[1], 0),
                                           ggml_view_1d(ctx0, arange, n, 0));
        kv = ggml_set_rows(ctx0, kv, rows, ggml_view_1d(ctx0, arange, n, row*ggml_element_size(arange)));
        row += n;
    };
    place(pool_lo, v.n_lo);
    place(pool_s, v.n_s);
    place(pool_o, v.n_o_pad);
    place(pool_o, v.n_tail);
    GGML_ASSERT(row == n_kv);
    return ggml_reshape_3d(ctx0, kv, D, H, n_kv);
}

// V^T [n_kv, H, D] of [LO | S | O | tail] (F16; nb[1] > nb[2], as llama.cpp's transposed V cache) for llama.cpp's
// attention without flash attention over host pools: one op reads the rows where they lie and writes them
// transposed. Given V as rows, llama.cpp copies it transposed, element by element on the CPU (1.4 of 22 s reading
// 12k tokens, docs/PROFILE.md)
ggml_tensor * llama_kv_cache_arkv::build_read_vt(ggml_context * ctx0, const view & v, ggml_tensor * pool_o,
                                                 ggml_tensor * pool_lo, ggml_tensor * pool_s) const {
    const int64_t D = head_dim_;
    const int64_t H = n_head_kv_;
    auto rows = [&](ggml_tensor * pool, int64_t n) -> ggml_tensor * { // the pool's first n rows
        return n > 0 ? ggml_view_2d(ctx0, pool, D*H, n, pool->nb[1], 0) : nullptr;
    };
    ggml_tensor * parts[4] = { rows(pool_lo, v.n_lo), rows(pool_s, v.n_s), rows(pool_o, v.n_o_pad), rows(pool_o, v.n_tail) };
    ggml_tensor * vt = llama_arkv_rows_t_cpu(ctx0, parts, 4);
    GGML_ASSERT(vt->ne[0] == (int64_t) (v.n_lo + v.n_s + v.n_o_pad + v.n_tail));
    return ggml_view_3d(ctx0, vt, vt->ne[0], H, D, D*vt->nb[1], vt->nb[1], 0);
}

// attention probabilities of the last n_sel queries over [LO rows | O rows]: F32 [n_kv, n_sel, n_head]
ggml_tensor * llama_kv_cache_arkv::build_probs(ggml_context * ctx0, ggml_tensor * q_cur, ggml_tensor * k_lo, ggml_tensor * k_o,
                                               ggml_tensor * mask, float kq_scale, int64_t n_sel) const {
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t n_head   = q_cur->ne[1];
    ggml_tensor * q = ggml_view_3d(ctx0, q_cur, q_cur->ne[0], n_head, n_sel, q_cur->nb[1], q_cur->nb[2],
                                   (n_tokens - n_sel)*q_cur->nb[2]);
    if (n_sel == 1) {
        // one query (decoding): the G query heads of a KV head as G columns of one product, so that each K row is
        // read once per group, not once per query head as with broadcasting. [n_kv, G, H] is [n_kv, 1, n_head]
        q = ggml_reshape_3d(ctx0, ggml_is_contiguous(q) ? q : ggml_cont(ctx0, q), q->ne[0], n_head/n_head_kv_, n_head_kv_);
    } else {
        q = ggml_permute(ctx0, q, 0, 2, 1, 3);                              // [D, n_sel, n_head]
    }
    auto logits = [&](ggml_tensor * k) {                                    // [n_rows, n_sel, n_head]
        ggml_tensor * kq = ggml_mul_mat(ctx0, k, q);                        // K rows read where they lie
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        return n_sel == 1 ? ggml_reshape_3d(ctx0, kq, kq->ne[0], 1, n_head) : kq;
    };
    ggml_tensor * kq = logits(k_o);
    if (k_lo) {
        kq = ggml_concat(ctx0, logits(k_lo), kq, 0);
    }
    // the last n_sel rows of a contiguous mask are contiguous
    ggml_tensor * m_sel = ggml_view_2d(ctx0, mask, mask->ne[0], n_sel, mask->nb[1], (n_tokens - n_sel)*mask->nb[1]);
    return ggml_soft_max_ext(ctx0, kq, m_sel, kq_scale, 0.0f);
}

// heavy-hitter statistics: p [n_kv, n_sel, n_head] summed over the queries and the GQA group into the accumulators.
// p and p^2 side by side as 2H heads, the group's heads added as G strided views, then one 2D transpose makes each
// key's sums a row [query][sum of p of each KV head, then of p^2]: the GPU kernels for these are coalesced (for a
// 4-D permute, or sums of rows of G values, they are not), and one in-place add per pool takes both planes
void llama_kv_cache_arkv::build_scores(ggml_context * ctx0, ggml_cgraph * gf, const layer & l, const view & v,
                                       ggml_tensor * p) const {
    const int64_t H = n_head_kv_;
    const int64_t n_kv  = p->ne[0];
    const int64_t n_sel = p->ne[1];
    const int64_t G = p->ne[2]/H;
    if (!ggml_is_contiguous(p)) {
        p = ggml_cont(ctx0, p);
    }
    ggml_tensor * pp = ggml_concat(ctx0, ggml_reshape_4d(ctx0, p, n_kv, n_sel, G, H),
                                   ggml_reshape_4d(ctx0, ggml_sqr(ctx0, p), n_kv, n_sel, G, H), 3); // [n_kv, n_sel, G, 2H]
    ggml_tensor * s = nullptr;                                              // [n_kv, n_sel, 2H]
    for (int64_t g = 0; g < G; ++g) {
        ggml_tensor * pg = ggml_view_3d(ctx0, pp, n_kv, n_sel, 2*H, pp->nb[1], pp->nb[3], g*pp->nb[2]);
        s = s ? ggml_add(ctx0, s, pg) : pg;
    }
    if (!ggml_is_contiguous(s)) {
        s = ggml_cont(ctx0, s);                                             // G == 1
    }
    s = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_reshape_2d(ctx0, s, n_kv, n_sel*2*H))); // [n_sel*2H, n_kv]
    if (n_sel > 1) {
        s = ggml_sum_rows(ctx0, ggml_reshape_3d(ctx0, s, n_sel, 2*H, n_kv));
    }
    s = ggml_reshape_2d(ctx0, s, 2*H, n_kv);
    // a pool's accumulators [H, cap, 2] (sums, then sums of squares) += its keys' columns [col0, col0 + n) of s
    auto accumulate = [&](ggml_tensor * acc, int64_t col0, int64_t n) {
        if (n == 0) {
            return;
        }
        ggml_tensor * dst = ggml_view_3d(ctx0, acc, H, n, 2, acc->nb[1], acc->nb[2], 0);
        ggml_tensor * add = ggml_view_3d(ctx0, s, H, n, 2, s->nb[1], H*ggml_element_size(s), col0*s->nb[1]);
        ggml_build_forward_expand(gf, ggml_add_inplace(ctx0, dst, add));
    };
    accumulate(l.acc_lo, 0, v.n_lo);
    accumulate(l.acc_s, v.n_lo, v.n_s);
    accumulate(l.acc_o, v.n_lo + v.n_s, v.n_o_pad);
}

// two flash attentions, over the LO rows as they lie (ggml-cuda's and Metal's vector kernels read q4_0) and
// over the O rows, merged exactly with the softmax mass w_lo of the LO rows, which the logits give:
// out = (Z_o out_o + Z_q out_lo) / (Z_o + Z_q) = out_o + w_lo (out_lo - out_o). The same probabilities feed the
// heavy-hitter scores, so the scores cost no second read of dequantized rows. Returns F32 [D*n_head, n_tokens].
ggml_tensor * llama_kv_cache_arkv::build_attn_segments(ggml_context * ctx0, ggml_cgraph * gf, const llm_graph_input_attn_kv_arkv * inp,
                                                       const layer & l, const view & v, ggml_tensor * q_cur,
                                                       ggml_tensor * k_o, ggml_tensor * v_o, ggml_tensor * mask,
                                                       float kq_scale, int64_t n_sel) const {
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t n_head   = q_cur->ne[1];

    // softmax over [LO rows | O rows] for every query of the (small) ubatch: w_lo and the scores
    ggml_tensor * p = build_probs(ctx0, q_cur, pool_heads(ctx0, l.k_lo, v.n_lo), pool_heads(ctx0, k_o, v.n_o_pad),
                                  mask, kq_scale, n_tokens);                // [n_kv, n_tokens, n_head]
    ggml_tensor * p_lo = ggml_view_3d(ctx0, p, v.n_lo, n_tokens, n_head, p->nb[1], p->nb[2], 0);
    ggml_tensor * w_lo = ggml_sum_rows(ctx0, p_lo);                            // [1, n_tokens, n_head]
    w_lo = n_tokens == 1 ? ggml_reshape_3d(ctx0, w_lo, 1, n_head, 1)          // [1, n_head, n_tokens]
                         : ggml_cont(ctx0, ggml_permute(ctx0, w_lo, 0, 2, 1, 3));
    if (n_sel > 0) {
        build_scores(ctx0, gf, l, v, ggml_view_3d(ctx0, p, p->ne[0], n_sel, n_head, p->nb[1], p->nb[2],
                                                  (n_tokens - n_sel)*p->nb[1]));
    }

    // masks: every LO row is older than the ubatch (all visible), padding rows hidden; O rows as the layer's window
    ggml_tensor * m_lo = ggml_view_2d(ctx0, inp->near.lo_mask, v.n_lo_pad, n_tokens, inp->near.lo_mask->nb[1],
                                     (inp->lay.n_lo_max - v.n_lo)*ggml_element_size(inp->near.lo_mask));
    ggml_tensor * m_o = ggml_view_2d(ctx0, mask, v.n_o_pad, n_tokens, mask->nb[1], v.n_lo*ggml_element_size(mask));
    // copies, also of one row: ggml-cuda's flash attention takes its GQA-optimized kernels only for masks whose
    // strides are multiples of 16 bytes, and reads them from an aligned start (a window of the shared mask is neither)
    m_lo = ggml_cont(ctx0, m_lo);
    m_o = mask->type == GGML_TYPE_F16 ? ggml_cont(ctx0, m_o) : ggml_cast(ctx0, m_o, GGML_TYPE_F16);

    ggml_tensor * q = ggml_permute(ctx0, q_cur, 0, 2, 1, 3);                // [D, n_tokens, n_head]
    auto fa = [&](ggml_tensor * k, ggml_tensor * vv, ggml_tensor * m) {
        ggml_tensor * out = ggml_flash_attn_ext(ctx0, q, k, vv, m, kq_scale, 0.0f, 0.0f);
        ggml_prec_set_acc(out, GGML_PREC_F32);
        return out;                                                          // [D, n_head, n_tokens]
    };
    ggml_tensor * out_lo = fa(pool_heads(ctx0, l.k_lo, v.n_lo_pad), pool_heads(ctx0, l.v_lo, v.n_lo_pad), m_lo);
    ggml_tensor * out_o = fa(pool_heads(ctx0, k_o, v.n_o_pad), pool_heads(ctx0, v_o, v.n_o_pad), m_o);
    ggml_tensor * out = ggml_add(ctx0, out_o, ggml_mul(ctx0, ggml_sub(ctx0, out_lo, out_o), w_lo));
    return ggml_reshape_2d(ctx0, out, out->ne[0]*n_head, n_tokens);
}

ggml_tensor * llama_kv_cache_arkv::build_kv(llm_graph_context & gctx, llm_graph_input_attn_kv_arkv * inp,
                                            ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur, float kq_scale,
                                            int il, ggml_tensor ** k_out, ggml_tensor ** v_out) const {
    ggml_context * ctx0 = gctx.ctx0;
    ggml_cgraph  * gf   = gctx.gf;

    const int32_t ikv = map_layer_ids[il];
    GGML_ASSERT(ikv >= 0);
    const auto & l = layers[ikv];
    const auto & v = inp->lay.views[ikv];
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t n_kv  = v.n_lo + v.n_s + v.n_o_pad;
    // a recall pass scores all its queries (the question), whatever the policy reads otherwise
    const int64_t n_sel = inp->lay.recall ? n_tokens : std::min<int64_t>(n_tokens, params.n_score_queries);

    if (!inp->near.k_idxs) { // the first layer: the inputs' copies beside its pools (see near), the same for all
        ggml_backend_t b = gctx.sched ? llama_arkv_backend_for(gctx.sched, l.k_arena->buffer) : nullptr;
        auto near = [&](ggml_tensor * t) -> ggml_tensor * {
            if (!t) {
                return nullptr;
            }
            ggml_tensor * c = ggml_cont(ctx0, t);
            if (b && ggml_backend_supports_op(b, c)) {
                ggml_backend_sched_set_tensor_backend(gctx.sched, c, b);
            }
            return c;
        };
        inp->near = { near(inp->self_k_idxs), near(inp->self_kq_mask), near(inp->lo_arange), near(inp->lo_mask) };
    }

    ggml_tensor * k_o;
    ggml_tensor * v_o;
    build_store(ctx0, gf, inp, l, ikv, k_cur, v_cur, &k_o, &v_o);

    attn_path path = choose_attn_path(gctx, l, v, n_tokens, inp->lay);
    if (path == ATTN_FUSED) {
        llama_arkv_attn_params ap;
        ap.scale  = kq_scale;
        ap.n_head = q_cur->ne[1];
        ap.n_lo   = v.n_lo;
        ap.n_s    = v.n_s;
        ap.n_o    = v.n_o_pad;
        ap.start  = v.start;
        ap.n_sel  = n_sel;
        // CPU: chunks of >= 64 keys, at most 64 (fewer for the many queries of a recall pass: the partial results
        // are n_chunk*n_tokens rows). A device: one block per chunk and KV head, chunks of >= 256 keys, at most 128
        // (1024 blocks for 8 KV heads; the partial results are written and read back once)
        ap.n_chunk = l.dev_fused ? std::clamp<int64_t>(n_kv/256, 1, std::clamp<int64_t>(1024/n_tokens, 16, 128))
                                 : std::clamp<int64_t>(n_kv/64, 1, std::clamp<int64_t>(512/n_tokens, 8, 64));
        ggml_tensor * out = llama_arkv_attn_cpu(ctx0, q_cur, { l.k_lo, l.v_lo, n_sel ? l.acc_lo : nullptr },
                                                { l.k_s, l.v_s, n_sel ? l.acc_s : nullptr },
                                                { k_o, v_o, n_sel ? l.acc_o : nullptr }, inp->near.kq_mask, ap);
        if (!l.dev_fused || (ggml_backend_dev_supports_op(l.dev_fused, out->src[0]) &&
                             ggml_backend_dev_supports_op(l.dev_fused, out))) {
            if (v.n_s > 0 && spill_map) {
                ggml_build_forward_expand(gf, build_release_spill(ctx0, out, ikv));
            }
            return out;
        }
        path = ATTN_SEGMENTS; // a shape the device's kernels do not take (the two ops stay out of the graph)
    }

    // this layer's window of the shared mask (the mask ops need it contiguous)
    const int64_t n_read = path == ATTN_SEGMENTS ? n_kv : n_kv + v.n_tail;
    ggml_tensor * mask = inp->near.kq_mask;
    if (v.start != 0 || n_read != mask->ne[0]) {
        mask = ggml_cont(ctx0, ggml_view_2d(ctx0, mask, n_read, n_tokens, mask->nb[1], v.start*ggml_element_size(mask)));
    }

    if (path == ATTN_SEGMENTS) {
        return build_attn_segments(ctx0, gf, inp, l, v, q_cur, k_o, v_o, mask, kq_scale, n_sel);
    }

    // ATTN_STOCK / ATTN_DEQUANT: llama.cpp's attention over f16 K/V
    ggml_tensor * k = build_read_dequant(ctx0, inp, v, k_o, l.k_lo, l.k_s);
    const bool v_t = !gctx.cparams.flash_attn && llama_arkv_attn_cpu_available() &&
                     ggml_backend_buffer_is_host(l.v_arena->buffer); // (the spill is in host memory too)
    ggml_tensor * vv = v_t ? build_read_vt(ctx0, v, v_o, l.v_lo, l.v_s) : build_read_dequant(ctx0, inp, v, v_o, l.v_lo, l.v_s);
    inp->self_kq_mask_cnv = mask; // read by build_attn right after this hook, for this layer

    if (n_sel > 0) {
        ggml_tensor * p = build_probs(ctx0, q_cur, nullptr, ggml_permute(ctx0, k, 0, 2, 1, 3), mask, kq_scale, n_sel);
        if (inp->lay.stats) {
            build_stats(ctx0, gf, l, p, v.n_lo + v.n_s + v.n_o - n_tokens + (n_tokens - n_sel));
        }
        const auto host = [](const ggml_tensor * t) { return !t || ggml_backend_buffer_is_host(t->buffer); };
        if (llama_arkv_attn_cpu_available() && host(l.acc_o) && host(v.n_lo ? l.acc_lo : nullptr) &&
            host(v.n_s ? l.acc_s : nullptr)) {
            // host accumulators: one pass over p on the CPU (build_scores' transposed copy of p goes element by
            // element there: 0.7 of 19.6 s reading 12k tokens, docs/PROFILE.md)
            llama_arkv_attn_params ap;
            ap.n_head = q_cur->ne[1];
            ap.n_lo   = v.n_lo;
            ap.n_s    = v.n_s;
            ap.n_o    = v.n_o_pad;
            ap.n_sel  = n_sel;
            ggml_build_forward_expand(gf, llama_arkv_scores_cpu(ctx0, p, { nullptr, nullptr, l.acc_lo },
                                                                { nullptr, nullptr, l.acc_s },
                                                                { nullptr, nullptr, l.acc_o }, ap));
        } else {
            build_scores(ctx0, gf, l, v, p);
        }
    }

    *k_out = k;
    *v_out = vv;
    return nullptr;
}

//
// graph input
//

void llm_graph_input_attn_kv_arkv::set_input(const llama_ubatch * ubatch) {
    const auto * kv = mctx_arkv->get_kv();
    kv->set_input_k_idxs(self_k_idxs, ubatch);
    kv->set_input_kq_mask(self_kq_mask, ubatch, lay);
    if (lo_mask && lo_mask->buffer) {
        kv->set_input_q_mask(lo_mask, lay);
    }
    if (lo_arange && lo_arange->buffer) {
        int32_t * data = (int32_t *) lo_arange->data;
        GGML_ASSERT(ggml_backend_buffer_is_host(lo_arange->buffer));
        for (int64_t i = 0; i < lo_arange->ne[0]; ++i) {
            data[i] = i;
        }
    }
    for (ggml_tensor * rot : { self_k_rot, self_v_rot }) {
        if (rot && rot->buffer) {
            kv->set_input_rot(rot);
        }
    }
}

bool llm_graph_input_attn_kv_arkv::can_reuse(const llm_graph_params & params) {
    const auto * m = dynamic_cast<const llama_kv_cache_arkv_context *>(params.mctx);
    if (!m || m->get_kv() != mctx_arkv->get_kv()) {
        return false;
    }
    mctx_arkv = m;
    return self_k_idxs->ne[0] == (int64_t) params.ubatch.n_tokens*(int64_t) m->get_kv()->n_layer() &&
           self_kq_mask->ne[1] == params.ubatch.n_tokens && m->get_layout() == lay;
}

//
// hooks
//

llm_graph_input_attn_kv * llama_arkv_build_attn_inp(const llm_graph_context & gctx) {
    const auto * mctx = dynamic_cast<const llama_kv_cache_arkv_context *>(gctx.mctx);
    if (!mctx) {
        return nullptr;
    }
    const auto * kv = mctx->get_kv();
    ggml_context * ctx0 = gctx.ctx0;
    const int64_t n_tokens = gctx.ubatch.n_tokens;

    auto inp = std::make_unique<llm_graph_input_attn_kv_arkv>(gctx.hparams, gctx.cparams, mctx);
    inp->lay = mctx->get_layout();

    inp->self_k_idxs = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, n_tokens*kv->n_layer());
    ggml_set_input(inp->self_k_idxs);
    ggml_set_name(inp->self_k_idxs, "arkv_inp_k_idxs");

    if (inp->lay.n_deq_max > 0) {
        inp->lo_arange = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, inp->lay.n_deq_max);
        ggml_set_input(inp->lo_arange);
        ggml_set_name(inp->lo_arange, "arkv_inp_lo_rows");
    }
    if (inp->lay.n_lo_max > 0) {
        if (n_tokens <= ARKV_DECODE_MAX_TOKENS) {
            inp->lo_mask = ggml_new_tensor_2d(ctx0, GGML_TYPE_F16, inp->lay.n_lo_max + inp->lay.lo_pad_max, n_tokens);
            ggml_set_input(inp->lo_mask);
            ggml_set_name(inp->lo_mask, "arkv_inp_q_mask");
        }
    }

    // flash attention requires an f16 mask
    inp->self_kq_mask = ggml_new_tensor_2d(ctx0, gctx.cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32,
                                           inp->lay.n_mask, n_tokens);
    ggml_set_input(inp->self_kq_mask);
    ggml_set_name(inp->self_kq_mask, "arkv_inp_kq_mask");
    inp->self_kq_mask_cnv = inp->self_kq_mask;

    if (kv->rotate_k()) {
        inp->self_k_rot = kv->build_input_rot(ctx0, kv->rot_k_size());
    }
    if (kv->rotate_v()) {
        inp->self_v_rot = kv->build_input_rot(ctx0, 64);
    }

    return (llm_graph_input_attn_kv *) gctx.res->add_input(std::move(inp));
}

ggml_tensor * llama_arkv_build_attn_kv(const llm_graph_context & gctx, llm_graph_input_attn_kv * inp,
                                       ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                       float kq_scale, int il, ggml_tensor ** k, ggml_tensor ** v) {
    auto * ia = static_cast<llm_graph_input_attn_kv_arkv *>(inp);
    return ia->mctx_arkv->get_kv()->build_kv(const_cast<llm_graph_context &>(gctx), ia, q_cur, k_cur, v_cur, kq_scale, il, k, v);
}

uint32_t llama_arkv_graph_extra_nodes(const llama_memory_i * mem) {
    const auto * kv = dynamic_cast<const llama_kv_cache_arkv *>(mem);
    return kv ? 112*kv->n_layer() : 0; // store, dequant + concat (LO, S), mask window, scores, statistics: ~85 per layer
}

bool llama_arkv_is_memory(const llama_memory_i * mem) {
    return dynamic_cast<const llama_kv_cache_arkv *>(mem) != nullptr;
}
