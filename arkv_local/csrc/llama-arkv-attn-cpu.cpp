#include "llama-arkv-attn-cpu.h"

#ifdef ARKV_HAVE_CPU_ATTN
#include "ggml-cpu.h"
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef ARKV_HAVE_CPU_ATTN

bool llama_arkv_attn_cpu_available() {
    return true;
}

namespace {

// the split-K pass's output: per chunk [M | S | acc] over the n_rows = n_tokens*n_head (query,
// head) rows, then the scored queries' logits [n_sel][n_head][n_kv]
struct part_view {
    int64_t n_rows;
    int64_t D;
    float * base;

    float * m(int64_t c)   const { return base + c*n_rows*(D + 2); }
    float * s(int64_t c)   const { return m(c) + n_rows; }
    float * acc(int64_t c) const { return m(c) + 2*n_rows; }
};

float mask_at(const ggml_tensor * mask, int64_t col, int64_t row) {
    const char * p = (const char *) mask->data + row*mask->nb[1] + col*ggml_element_size(mask);
    return mask->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(*(const ggml_fp16_t *) p) : *(const float *) p;
}

// the queries in the types the dot products take, as llama.cpp's flash attention does: f16 for O rows,
// the LO type's vec_dot_type (q8_0 for q4_0) for LO rows, which are then read as they are
struct query_rows {
    std::vector<ggml_fp16_t> f16; // [n_tok*n_head][D]
    std::vector<char> lo;         // [n_tok*n_head][row_lo]
    size_t row_lo = 0;
};

query_rows convert_queries(const ggml_tensor * q, const ggml_type_traits_cpu * tr_klo) {
    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    query_rows qr;
    qr.row_lo = tr_klo ? ggml_row_size(tr_klo->vec_dot_type, D) : 0;
    qr.f16.resize(n_tok*n_head*D);
    qr.lo.resize(n_tok*n_head*qr.row_lo);
    const auto * tr_f16 = ggml_get_type_traits_cpu(GGML_TYPE_F16);
    for (int64_t t = 0; t < n_tok; ++t) {
        for (int64_t h = 0; h < n_head; ++h) {
            const float * src = (const float *) ((const char *) q->data + h*q->nb[1] + t*q->nb[2]);
            const int64_t r = t*n_head + h;
            tr_f16->from_float(src, qr.f16.data() + r*D, D);
            if (tr_klo) {
                ggml_get_type_traits_cpu(tr_klo->vec_dot_type)->from_float(src, qr.lo.data() + r*qr.row_lo, D);
            }
        }
    }
    return qr;
}

// one key row's scaled logits s[n_tok*n_head] for every query row; -inf where the mask mv[n_tok] hides it
void key_logits(const ggml_type_traits_cpu * tr, const char * k_row, size_t k_head, const query_rows & qr, bool is_lo,
                const float * mv, float scale, int64_t n_tok, int64_t n_head, int64_t G, int64_t D, float * s) {
    for (int64_t h = 0; h < n_head; ++h) {
        const char * k = k_row + (h/G)*k_head;
        for (int64_t t = 0; t < n_tok; ++t) {
            if (mv[t] == -INFINITY) {
                continue;
            }
            const int64_t r = t*n_head + h;
            const void * qv = is_lo ? (const void *) (qr.lo.data() + r*qr.row_lo) : (const void *) (qr.f16.data() + r*D);
            float dot = 0.0f;
            tr->vec_dot(D, &dot, 0, k, 0, qv, 0, 1);
            s[r] = dot*scale + mv[t];
        }
    }
}

// one key's logits s[n_rows] (-inf: hidden) and V rows vf[H][D] into each query row's running max M, sum S
// and weighted V sum acc: online softmax, as ggml's flash attention
void online_softmax_add(const float * s, const float * vf, int64_t n_rows, int64_t n_head, int64_t G, int64_t D,
                        float * M, float * S, float * acc) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const float sv = s[r];
        if (sv == -INFINITY) {
            continue;
        }
        float ms = 1.0f;
        float vs = 1.0f;
        float * a = acc + r*D;
        if (sv > M[r]) {
            ms = expf(M[r] - sv);
            M[r] = sv;
            for (int64_t d = 0; d < D; ++d) {
                a[d] *= ms;
            }
        } else {
            vs = expf(sv - M[r]);
        }
        S[r] = S[r]*ms + vs;
        const float * vrow = vf + ((r % n_head)/G)*D;
        for (int64_t d = 0; d < D; ++d) {
            a[d] += vs*vrow[d];
        }
    }
}

// src: q, k_o, v_o, mask[, k_lo, v_lo]
void arkv_attn_partial(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_arkv_attn_params *) userdata;
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k_o  = dst->src[1];
    const ggml_tensor * v_o  = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const ggml_tensor * k_lo  = p->n_lo > 0 ? dst->src[4] : nullptr;
    const ggml_tensor * v_lo  = p->n_lo > 0 ? dst->src[5] : nullptr;

    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    const int64_t H      = k_o->ne[0]/D;
    const int64_t G      = n_head/H;
    const int64_t n_rows = n_tok*n_head;
    const int64_t n_kv   = p->n_lo + p->n_o;
    const int64_t sel0   = n_tok - p->n_sel;

    const part_view pv = { n_rows, D, (float *) dst->data };
    float * logits = pv.m(p->n_chunk);

    const auto * tr_f16 = ggml_get_type_traits_cpu(GGML_TYPE_F16);
    const auto * tr_klo = k_lo ? ggml_get_type_traits_cpu(k_lo->type) : nullptr;
    const auto to_float_lo = v_lo ? ggml_get_type_traits(v_lo->type)->to_float : nullptr;
    const size_t k_head = k_lo ? ggml_row_size(k_lo->type, D) : 0;

    const query_rows qr = convert_queries(q, tr_klo);
    std::vector<float> vf(D*H), s(n_rows), mv(n_tok);
    for (int64_t c = ith; c < p->n_chunk; c += nth) {
        float * M   = pv.m(c);
        float * S   = pv.s(c);
        float * acc = pv.acc(c);
        std::fill_n(M, n_rows, -INFINITY);
        std::fill_n(S, n_rows, 0.0f);
        std::fill_n(acc, n_rows*D, 0.0f);

        const int64_t j0 = n_kv*c/p->n_chunk;
        const int64_t j1 = n_kv*(c + 1)/p->n_chunk;
        for (int64_t j = j0; j < j1; ++j) {
            bool any = false;
            for (int64_t t = 0; t < n_tok; ++t) {
                mv[t] = mask_at(mask, p->start + j, t);
                any = any || mv[t] != -INFINITY;
            }
            std::fill(s.begin(), s.end(), -INFINITY);
            if (any) {
                const bool is_lo = j < p->n_lo;
                const char * k_row = is_lo ? (const char *) k_lo->data + j*k_lo->nb[1]
                                          : (const char *) k_o->data + (j - p->n_lo)*k_o->nb[1];
                key_logits(is_lo ? tr_klo : tr_f16, k_row, is_lo ? k_head : D*sizeof(ggml_fp16_t), qr, is_lo, mv.data(),
                           p->scale, n_tok, n_head, G, D, s.data());
                if (is_lo) {
                    to_float_lo((const char *) v_lo->data + j*v_lo->nb[1], vf.data(), D*H);
                } else {
                    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) ((const char *) v_o->data + (j - p->n_lo)*v_o->nb[1]),
                                          vf.data(), D*H);
                }
                online_softmax_add(s.data(), vf.data(), n_rows, n_head, G, D, M, S, acc);
            }
            for (int64_t ts = 0; ts < p->n_sel; ++ts) {
                for (int64_t h = 0; h < n_head; ++h) {
                    logits[(ts*n_head + h)*n_kv + j] = s[(sel0 + ts)*n_head + h];
                }
            }
        }
    }
}

// the final max and sum of a row over the chunks
void row_final(const part_view & pv, int64_t n_chunk, int64_t r, float & m, float & l) {
    m = -INFINITY;
    for (int64_t c = 0; c < n_chunk; ++c) {
        m = std::max(m, pv.m(c)[r]);
    }
    l = 0.0f;
    for (int64_t c = 0; c < n_chunk; ++c) {
        if (pv.s(c)[r] > 0.0f) {
            l += pv.s(c)[r]*expf(pv.m(c)[r] - m);
        }
    }
}

// the scored queries' attention probabilities, summed over them and the GQA group, into the accumulators
// (src[1] acc_o, src[2] acc_lo); every thread needs the scored rows' final max and sum; keys are split over threads
void accumulate_scores(ggml_tensor * dst, const llama_arkv_attn_params * p, const part_view & pv, int ith, int nth) {
    if (p->n_sel == 0) {
        return;
    }
    const int64_t n_head = p->n_head;
    const int64_t n_tok  = dst->ne[1];
    const int64_t n_kv   = p->n_lo + p->n_o;
    const int64_t sel0   = n_tok - p->n_sel;
    ggml_tensor * acc_o = dst->src[1];
    ggml_tensor * acc_lo = p->n_lo > 0 ? dst->src[2] : nullptr;
    const int64_t H = acc_o->ne[0];
    const int64_t G = n_head/H;
    const float * logits = pv.m(p->n_chunk);
    std::vector<float> mf(p->n_sel*n_head), lf(p->n_sel*n_head);
    for (int64_t i = 0; i < p->n_sel*n_head; ++i) {
        row_final(pv, p->n_chunk, sel0*n_head + i, mf[i], lf[i]);
    }
    const int64_t j0 = n_kv*ith/nth;
    const int64_t j1 = n_kv*(ith + 1)/nth;
    for (int64_t j = j0; j < j1; ++j) {
        const bool is_lo = j < p->n_lo;
        ggml_tensor * acc = is_lo ? acc_lo : acc_o;
        const int64_t slot = is_lo ? j : j - p->n_lo;
        for (int64_t hk = 0; hk < H; ++hk) {
            float s1 = 0.0f;
            float s2 = 0.0f;
            for (int64_t ts = 0; ts < p->n_sel; ++ts) {
                for (int64_t h = hk*G; h < (hk + 1)*G; ++h) {
                    const int64_t i = ts*n_head + h;
                    const float x = logits[i*n_kv + j];
                    if (x == -INFINITY || lf[i] == 0.0f) {
                        continue;
                    }
                    const float pr = expf(x - mf[i])/lf[i];
                    s1 += pr;
                    s2 += pr*pr;
                }
            }
            if (s1 == 0.0f) {
                continue;
            }
            char * a = (char *) acc->data + hk*acc->nb[0] + slot*acc->nb[1];
            *(float *) a += s1;
            *(float *) (a + acc->nb[2]) += s2;
        }
    }
}

// src: part[, acc_o, acc_lo]
void arkv_attn_combine(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_arkv_attn_params *) userdata;
    const int64_t n_head = p->n_head;
    const int64_t D      = dst->ne[0]/n_head;
    const int64_t n_tok  = dst->ne[1];
    const int64_t n_rows = n_tok*n_head;

    const part_view pv = { n_rows, D, (float *) dst->src[0]->data };

    for (int64_t r = ith; r < n_rows; r += nth) {
        float * out = (float *) dst->data + r*D;
        std::fill_n(out, D, 0.0f);
        float m, l;
        row_final(pv, p->n_chunk, r, m, l);
        if (l == 0.0f) {
            continue; // no visible key
        }
        for (int64_t c = 0; c < p->n_chunk; ++c) {
            if (pv.s(c)[r] == 0.0f) {
                continue;
            }
            const float w = expf(pv.m(c)[r] - m)/l;
            const float * a = pv.acc(c) + r*D;
            for (int64_t d = 0; d < D; ++d) {
                out[d] += w*a[d];
            }
        }
    }

    accumulate_scores(dst, p, pv, ith, nth);
}

} // namespace

ggml_tensor * llama_arkv_attn_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_lo, ggml_tensor * v_lo,
                                  ggml_tensor * k_o, ggml_tensor * v_o, ggml_tensor * mask,
                                  ggml_tensor * acc_lo, ggml_tensor * acc_o, llama_arkv_attn_params * p) {
    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    const int64_t n_kv   = p->n_lo + p->n_o;
    GGML_ASSERT(q->type == GGML_TYPE_F32 && k_o->type == GGML_TYPE_F16 && v_o->type == GGML_TYPE_F16);
    GGML_ASSERT(p->n_head == n_head && k_o->ne[0] % D == 0 && n_head % (k_o->ne[0]/D) == 0);
    GGML_ASSERT(p->n_sel >= 0 && p->n_sel <= n_tok && p->n_chunk >= 1 && n_kv > 0);
    GGML_ASSERT(p->n_lo == 0 || (k_lo && v_lo && k_lo->type == v_lo->type));
    GGML_ASSERT(p->n_sel == 0 || (acc_o && (p->n_lo == 0 || acc_lo)));

    ggml_tensor * args_a[6] = { q, k_o, v_o, mask, k_lo, v_lo };
    const int64_t n_part = p->n_chunk*n_tok*n_head*(D + 2) + p->n_sel*n_head*n_kv;
    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, n_part, 1, 1, 1, args_a, p->n_lo > 0 ? 6 : 4,
                                        arkv_attn_partial, GGML_N_TASKS_MAX, p);

    ggml_tensor * args_b[3] = { part, acc_o, acc_lo };
    const int n_b = p->n_sel == 0 ? 1 : (p->n_lo > 0 ? 3 : 2);
    return ggml_custom_4d(ctx, GGML_TYPE_F32, D*n_head, n_tok, 1, 1, args_b, n_b, arkv_attn_combine, GGML_N_TASKS_MAX, p);
}

#else // the CPU backend is not linked into libllama (GGML_BACKEND_DL): the dequantizing path only

bool llama_arkv_attn_cpu_available() {
    return false;
}

ggml_tensor * llama_arkv_attn_cpu(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *,
                                  ggml_tensor *, ggml_tensor *, ggml_tensor *, ggml_tensor *, llama_arkv_attn_params *) {
    GGML_ABORT("arkv: the fused CPU attention is not built in");
}

#endif
