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

// src: q, k_o, v_o, mask[, k_q, v_q]
void arkv_attn_partial(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_arkv_attn_params *) userdata;
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k_o  = dst->src[1];
    const ggml_tensor * v_o  = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const ggml_tensor * k_q  = p->n_q > 0 ? dst->src[4] : nullptr;
    const ggml_tensor * v_q  = p->n_q > 0 ? dst->src[5] : nullptr;

    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    const int64_t H      = k_o->ne[0]/D;
    const int64_t G      = n_head/H;
    const int64_t n_rows = n_tok*n_head;
    const int64_t n_kv   = p->n_q + p->n_o;
    const int64_t sel0   = n_tok - p->n_sel;

    const part_view pv = { n_rows, D, (float *) dst->data };
    float * logits = pv.m(p->n_chunk);

    const auto * tr_f16 = ggml_get_type_traits_cpu(GGML_TYPE_F16);
    const auto * tr_kq  = k_q ? ggml_get_type_traits_cpu(k_q->type) : nullptr;
    const auto to_float_q = v_q ? ggml_get_type_traits(v_q->type)->to_float : nullptr;

    // queries in the types the dot products take, as llama.cpp's flash attention does: f16 for O
    // rows, the Q type's vec_dot_type (q8_0 for q4_0) for Q rows, which are then read as they are
    const size_t row_kq = tr_kq ? ggml_row_size(tr_kq->vec_dot_type, D) : 0;
    const size_t k_head = k_q ? ggml_row_size(k_q->type, D) : 0;
    std::vector<char> qq(n_rows*row_kq);
    std::vector<ggml_fp16_t> q16(n_rows*D);
    for (int64_t t = 0; t < n_tok; ++t) {
        for (int64_t h = 0; h < n_head; ++h) {
            const float * src = (const float *) ((const char *) q->data + h*q->nb[1] + t*q->nb[2]);
            const int64_t r = t*n_head + h;
            tr_f16->from_float(src, q16.data() + r*D, D);
            if (tr_kq) {
                ggml_get_type_traits_cpu(tr_kq->vec_dot_type)->from_float(src, qq.data() + r*row_kq, D);
            }
        }
    }

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
                const bool is_q = j < p->n_q;
                const char * k_row = is_q ? (const char *) k_q->data + j*k_q->nb[1]
                                          : (const char *) k_o->data + (j - p->n_q)*k_o->nb[1];
                for (int64_t h = 0; h < n_head; ++h) {
                    const int64_t hk = h/G;
                    for (int64_t t = 0; t < n_tok; ++t) {
                        if (mv[t] == -INFINITY) {
                            continue;
                        }
                        const int64_t r = t*n_head + h;
                        float dot = 0.0f;
                        if (is_q) {
                            tr_kq->vec_dot(D, &dot, 0, k_row + hk*k_head, 0, qq.data() + r*row_kq, 0, 1);
                        } else {
                            tr_f16->vec_dot(D, &dot, 0, (const ggml_fp16_t *) k_row + hk*D, 0, q16.data() + r*D, 0, 1);
                        }
                        s[r] = dot*p->scale + mv[t];
                    }
                }
                if (is_q) {
                    to_float_q((const char *) v_q->data + j*v_q->nb[1], vf.data(), D*H);
                } else {
                    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) ((const char *) v_o->data + (j - p->n_q)*v_o->nb[1]),
                                          vf.data(), D*H);
                }
                // online softmax, as ggml's flash attention
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
                    const float * vrow = vf.data() + ((r % n_head)/G)*D;
                    for (int64_t d = 0; d < D; ++d) {
                        a[d] += vs*vrow[d];
                    }
                }
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

// src: part[, acc_o, acc_q]
void arkv_attn_combine(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_arkv_attn_params *) userdata;
    const int64_t n_head = p->n_head;
    const int64_t D      = dst->ne[0]/n_head;
    const int64_t n_tok  = dst->ne[1];
    const int64_t n_rows = n_tok*n_head;
    const int64_t n_kv   = p->n_q + p->n_o;
    const int64_t sel0   = n_tok - p->n_sel;

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

    if (p->n_sel == 0) {
        return;
    }
    // scores: every thread needs the scored rows' final max and sum; keys are split over threads
    ggml_tensor * acc_o = dst->src[1];
    ggml_tensor * acc_q = p->n_q > 0 ? dst->src[2] : nullptr;
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
        const bool is_q = j < p->n_q;
        ggml_tensor * acc = is_q ? acc_q : acc_o;
        const int64_t slot = is_q ? j : j - p->n_q;
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

} // namespace

ggml_tensor * llama_arkv_attn_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_q, ggml_tensor * v_q,
                                  ggml_tensor * k_o, ggml_tensor * v_o, ggml_tensor * mask,
                                  ggml_tensor * acc_q, ggml_tensor * acc_o, llama_arkv_attn_params * p) {
    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    const int64_t n_kv   = p->n_q + p->n_o;
    GGML_ASSERT(q->type == GGML_TYPE_F32 && k_o->type == GGML_TYPE_F16 && v_o->type == GGML_TYPE_F16);
    GGML_ASSERT(p->n_head == n_head && k_o->ne[0] % D == 0 && n_head % (k_o->ne[0]/D) == 0);
    GGML_ASSERT(p->n_sel >= 0 && p->n_sel <= n_tok && p->n_chunk >= 1 && n_kv > 0);
    GGML_ASSERT(p->n_q == 0 || (k_q && v_q && k_q->type == v_q->type));
    GGML_ASSERT(p->n_sel == 0 || (acc_o && (p->n_q == 0 || acc_q)));

    ggml_tensor * args_a[6] = { q, k_o, v_o, mask, k_q, v_q };
    const int64_t n_part = p->n_chunk*n_tok*n_head*(D + 2) + p->n_sel*n_head*n_kv;
    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, n_part, 1, 1, 1, args_a, p->n_q > 0 ? 6 : 4,
                                        arkv_attn_partial, GGML_N_TASKS_MAX, p);

    ggml_tensor * args_b[3] = { part, acc_o, acc_q };
    const int n_b = p->n_sel == 0 ? 1 : (p->n_q > 0 ? 3 : 2);
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
