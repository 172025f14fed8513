#include "llama-arkv-attn-cpu.h"

#ifdef ARKV_HAVE_CPU_ATTN
#include "ggml-cpu.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ARKV_ATTN_AVX2
#endif

#ifdef ARKV_HAVE_CPU_ATTN

bool llama_arkv_attn_cpu_available() {
    return true;
}

namespace {

//
// layout of the split-K pass's output
//

// per chunk c: [M | S | acc] over the n_rows = n_tokens*n_head (query, head) rows, where M is the chunk's
// largest logit, S = sum exp(s - M) and acc = sum exp(s - M)*v; then the scored queries' unnormalized
// probabilities exp(s - M_c) [n_sel][n_head][n_kv], relative to the max of the chunk that holds the key,
// so that the combine turns them into probabilities with one multiplication per key (no second exp)
struct part_view {
    int64_t n_rows;
    int64_t D;
    float * base;

    float * m(int64_t c)   const { return base + c*n_rows*(D + 2); }
    float * s(int64_t c)   const { return m(c) + n_rows; }
    float * acc(int64_t c) const { return m(c) + 2*n_rows; }
};

// the keys [j0, j1) of chunk c; fixed by n_chunk alone, so the result does not depend on the thread count
int64_t chunk_begin(int64_t n_kv, int64_t n_chunk, int64_t c) {
    return n_kv*c/n_chunk;
}

//
// vector helpers (AVX2 where the CPU backend is built for it, portable loops otherwise)
//

// y[i] = exp(x[i] - m) in place, returns the sum; x[i] == -inf gives 0. m must be finite.
// The AVX2 exp is ggml's ggml_v_expf (ggml-cpu/vec.h, 1.5 ulp), as ggml_vec_soft_max_f32 uses
#ifdef ARKV_ATTN_AVX2
inline __m256 v_expf(__m256 x) {
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
    const __m256 k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1))));
    const __m256i c = _mm256_castps_si256(
        _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), n), _mm256_set1_ps(126), _CMP_GT_OQ));
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b, _mm256_set1_ps(0x1.573e2ep-5f)), u,
                        _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b, _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_mul_ps(_mm256_set1_ps(0x1.ffffecp-1f), b));
    if (!_mm256_movemask_ps(_mm256_castsi256_ps(c))) {
        return _mm256_fmadd_ps(j, k, k);
    }
    const __m256i g = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
                                       _mm256_set1_epi32(0x82000000u));
    const __m256 s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000u)));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    const __m256i d = _mm256_castps_si256(
        _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), n), _mm256_set1_ps(192), _CMP_GT_OQ));
    return _mm256_or_ps(
        _mm256_and_ps(_mm256_castsi256_ps(d), _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(_mm256_castsi256_ps(d),
                         _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(c), _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                                      _mm256_andnot_ps(_mm256_castsi256_ps(c), _mm256_fmadd_ps(k, j, k)))));
}
#endif

float exp_sub_sum(float * x, int64_t n, float m) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef ARKV_ATTN_AVX2
    __m256 vsum = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = v_expf(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, v);
        vsum = _mm256_add_ps(vsum, v);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    sum = _mm_cvtss_f32(h);
#endif
    for (; i < n; ++i) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

// y[i] += a*x[i]
inline void axpy(float * y, const float * x, float a, int64_t n) {
    int64_t i = 0;
#ifdef ARKV_ATTN_AVX2
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    }
#endif
    for (; i < n; ++i) {
        y[i] += a*x[i];
    }
}

// keys added to an accumulator together in the V sums
constexpr int64_t v_group = 4;
static_assert(v_group == 4, "axpy_group's AVX2 path adds 4 keys at a time");

// y[i] += sum_k w[k]*x[k*x_stride + i] for n_w <= v_group rows of x, y read and written once
inline void axpy_group(float * y, const float * x, int64_t x_stride, const float * w, int64_t n_w, int64_t n) {
    int64_t i = 0;
#ifdef ARKV_ATTN_AVX2
    if (n_w == v_group) {
        const __m256 w0 = _mm256_set1_ps(w[0]);
        const __m256 w1 = _mm256_set1_ps(w[1]);
        const __m256 w2 = _mm256_set1_ps(w[2]);
        const __m256 w3 = _mm256_set1_ps(w[3]);
        for (; i + 8 <= n; i += 8) {
            __m256 a = _mm256_loadu_ps(y + i);
            a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 0*x_stride + i), a);
            a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 1*x_stride + i), a);
            a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 2*x_stride + i), a);
            a = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 3*x_stride + i), a);
            _mm256_storeu_ps(y + i, a);
        }
    }
#endif
    if (i < n) {
        for (int64_t k = 0; k < n_w; ++k) {
            axpy(y + i, x + k*x_stride + i, w[k], n - i);
        }
    }
}

#ifdef ARKV_ATTN_AVX2
// the V sums of nk <= v_group f16 keys read where they lie (v[k]: key k's row of H heads), D % 8 == 0: each query
// row r (n_tok x n_head) adds sum_k s[r*n + keys[k]] * v[k][its KV head]. Each value is converted once, for all the
// rows of its GQA group; the same sums in the same order as axpy_group over the rows converted to f32 first,
// without that pass (12% of a decoded token's time with nothing evicted, SmolLM2 at 4096 tokens)
template <int NK> // NK keys: their values stay in registers
void add_f16_keys_n(float * acc, const float * s, int64_t n, const int64_t * keys, const ggml_fp16_t * const * v,
                    int64_t n_tok, int64_t n_head, int64_t H, int64_t D) {
    constexpr int64_t nk = NK;
    const int64_t G = n_head/H;
    for (int64_t hk = 0; hk < H; ++hk) {
        for (int64_t i = 0; i < D; i += 8) {
            __m256 x[NK];
            for (int64_t k = 0; k < nk; ++k) {
                x[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v[k] + hk*D + i)));
            }
            for (int64_t t = 0; t < n_tok; ++t) {
                for (int64_t r = t*n_head + hk*G; r < t*n_head + (hk + 1)*G; ++r) {
                    __m256 a = _mm256_loadu_ps(acc + r*D + i);
                    for (int64_t k = 0; k < nk; ++k) {
                        a = _mm256_fmadd_ps(_mm256_set1_ps(s[r*n + keys[k]]), x[k], a);
                    }
                    _mm256_storeu_ps(acc + r*D + i, a);
                }
            }
        }
    }
}

void add_f16_keys(float * acc, const float * s, int64_t n, const int64_t * keys, const ggml_fp16_t * const * v,
                  int64_t nk, int64_t n_tok, int64_t n_head, int64_t H, int64_t D) {
    static_assert(v_group == 4, "one case per group size");
    switch (nk) {
        case 1: add_f16_keys_n<1>(acc, s, n, keys, v, n_tok, n_head, H, D); break;
        case 2: add_f16_keys_n<2>(acc, s, n, keys, v, n_tok, n_head, H, D); break;
        case 3: add_f16_keys_n<3>(acc, s, n, keys, v, n_tok, n_head, H, D); break;
        case 4: add_f16_keys_n<4>(acc, s, n, keys, v, n_tok, n_head, H, D); break;
        default: break; // no visible key in the group
    }
}
#endif

//
// reading V rows to f32
//

// ggml's block layouts (ggml-common.h is internal to ggml); checked against the type traits in llama_arkv_attn_cpu
struct block_q4_0_view { ggml_fp16_t d;                 uint8_t qs[16]; };
struct block_q4_1_view { ggml_fp16_t d; ggml_fp16_t m;  uint8_t qs[16]; };
struct block_q8_0_view { ggml_fp16_t d;                 int8_t  qs[32]; };
static_assert(sizeof(block_q4_0_view) == 18 && sizeof(block_q4_1_view) == 20 && sizeof(block_q8_0_view) == 34,
              "ggml block layouts");

inline float fp16_to_f32(ggml_fp16_t h) {
#ifdef ARKV_ATTN_AVX2
    return _cvtsh_ss(h);
#else
    return ggml_fp16_to_fp32(h);
#endif
}

// y[32*ib + i] = (q - 8)*d: the low nibbles are elements 0..15, the high nibbles 16..31
void dequant_q4_0(const void * src, float * y, int64_t n) {
    const auto * b = (const block_q4_0_view *) src;
    for (int64_t ib = 0; ib < n/32; ++ib, y += 32) {
        const float d = fp16_to_f32(b[ib].d);
#ifdef ARKV_ATTN_AVX2
        const __m256 vd = _mm256_set1_ps(d);
        const __m128i q  = _mm_loadu_si128((const __m128i *) b[ib].qs);
        const __m128i m4 = _mm_set1_epi8(0x0F);
        const __m128i o8 = _mm_set1_epi8(8);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), o8);
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), o8);
        _mm256_storeu_ps(y +  0, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
        _mm256_storeu_ps(y +  8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
        _mm256_storeu_ps(y + 16, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
        _mm256_storeu_ps(y + 24, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
#else
        for (int i = 0; i < 16; ++i) {
            y[i]      = ((b[ib].qs[i] & 0x0F) - 8)*d;
            y[i + 16] = ((b[ib].qs[i] >>   4) - 8)*d;
        }
#endif
    }
}

void dequant_q4_1(const void * src, float * y, int64_t n) {
    const auto * b = (const block_q4_1_view *) src;
    for (int64_t ib = 0; ib < n/32; ++ib, y += 32) {
        const float d = fp16_to_f32(b[ib].d);
        const float m = fp16_to_f32(b[ib].m);
        for (int i = 0; i < 16; ++i) {
            y[i]      = (b[ib].qs[i] & 0x0F)*d + m;
            y[i + 16] = (b[ib].qs[i] >>   4)*d + m;
        }
    }
}

void dequant_q8_0(const void * src, float * y, int64_t n) {
    const auto * b = (const block_q8_0_view *) src;
    for (int64_t ib = 0; ib < n/32; ++ib, y += 32) {
        const float d = fp16_to_f32(b[ib].d);
        for (int i = 0; i < 32; ++i) {
            y[i] = b[ib].qs[i]*d;
        }
    }
}

void dequant_f16(const void * src, float * y, int64_t n) {
    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, y, n);
}

using dequant_fn = void (*)(const void *, float *, int64_t);

// a V row reader: ours for the LO types the cache offers (ggml-base's to_float is scalar), else ggml's
struct row_reader {
    dequant_fn fn = nullptr;
    ggml_to_float_t to_float = nullptr;

    void operator()(const void * src, float * y, int64_t n) const {
        if (fn) {
            fn(src, y, n);
        } else {
            to_float(src, y, n);
        }
    }
};

row_reader make_reader(ggml_type type) {
    row_reader r;
    switch (type) {
        case GGML_TYPE_Q4_0: r.fn = dequant_q4_0; break;
        case GGML_TYPE_Q4_1: r.fn = dequant_q4_1; break;
        case GGML_TYPE_Q8_0: r.fn = dequant_q8_0; break;
        case GGML_TYPE_F16:  r.fn = dequant_f16;  break;
        default:             r.to_float = ggml_get_type_traits(type)->to_float; break;
    }
    GGML_ASSERT(r.fn || r.to_float);
    return r;
}

//
// K . q for q4_0 rows
//

#ifdef ARKV_ATTN_AVX2
constexpr int64_t dot_group_max = 8;

inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

// out[g*out_stride] = k . q_g for n_q <= dot_group_max q8_0 queries q_g = q + g*q_stride (one KV head's GQA
// group): ggml's ggml_vec_dot_q4_0_q8_0 (AVX2: the same arithmetic in the same order, so the same result),
// with the key's nibbles unpacked once per block for the whole group instead of once per query, and no
// call through the type traits per query
template <int N> // N queries: their accumulators stay in registers (a runtime count keeps them on the stack)
void dot_q4_0_group_n(int64_t D, const void * k, const char * q, size_t q_stride, float * out, int64_t out_stride) {
    const auto * x = (const block_q4_0_view *) k;
    __m256 acc[N];
    for (int g = 0; g < N; ++g) {
        acc[g] = _mm256_setzero_ps();
    }
    for (int64_t ib = 0; ib < D/32; ++ib) {
        const __m128i tmp = _mm_loadu_si128((const __m128i *) x[ib].qs);
        const __m256i qx  = _mm256_sub_epi8(_mm256_and_si256(_mm256_set1_epi8(0x0F),
                                                             _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp)),
                                            _mm256_set1_epi8(8));
        const __m256i ax  = _mm256_sign_epi8(qx, qx);
        const float   dx  = fp16_to_f32(x[ib].d);
        for (int g = 0; g < N; ++g) {
            const auto * y = (const block_q8_0_view *) (q + g*q_stride) + ib;
            const __m256  d   = _mm256_set1_ps(dx*fp16_to_f32(y->d));
            const __m256i sy  = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *) y->qs), qx);
            const __m256i dot = _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy));
            acc[g] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc[g]);
        }
    }
    for (int g = 0; g < N; ++g) {
        out[g*out_stride] = hsum(acc[g]);
    }
}

void dot_q4_0_group(int64_t D, const void * k, const char * q, size_t q_stride, int64_t n_q, float * out, int64_t out_stride) {
    static_assert(dot_group_max == 8, "one case per group size");
    switch (n_q) {
        case 1: dot_q4_0_group_n<1>(D, k, q, q_stride, out, out_stride); break;
        case 2: dot_q4_0_group_n<2>(D, k, q, q_stride, out, out_stride); break;
        case 3: dot_q4_0_group_n<3>(D, k, q, q_stride, out, out_stride); break;
        case 4: dot_q4_0_group_n<4>(D, k, q, q_stride, out, out_stride); break;
        case 5: dot_q4_0_group_n<5>(D, k, q, q_stride, out, out_stride); break;
        case 6: dot_q4_0_group_n<6>(D, k, q, q_stride, out, out_stride); break;
        case 7: dot_q4_0_group_n<7>(D, k, q, q_stride, out, out_stride); break;
        case 8: dot_q4_0_group_n<8>(D, k, q, q_stride, out, out_stride); break;
        default: GGML_ABORT("arkv: a GQA group of %d is read per query", (int) n_q);
    }
}

// out[g*out_stride] = k . q_g for n_q <= dot_group_max f32 queries q_g = q + g*D (one KV head's GQA group)
// and an f16 key, converted once for the whole group; D % 8 == 0. llama.cpp's flash attention instead rounds
// each query to f16 and converts the key once per query head
template <int N>
void dot_f16_group_n(int64_t D, const ggml_fp16_t * k, const float * q, float * out, int64_t out_stride) {
    __m256 acc[N];
    for (int g = 0; g < N; ++g) {
        acc[g] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < D; i += 8) {
        const __m256 kx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + i)));
        for (int g = 0; g < N; ++g) {
            acc[g] = _mm256_fmadd_ps(kx, _mm256_loadu_ps(q + g*D + i), acc[g]);
        }
    }
    for (int g = 0; g < N; ++g) {
        out[g*out_stride] = hsum(acc[g]);
    }
}

void dot_f16_group(int64_t D, const ggml_fp16_t * k, const float * q, int64_t n_q, float * out, int64_t out_stride) {
    switch (n_q) {
        case 1: dot_f16_group_n<1>(D, k, q, out, out_stride); break;
        case 2: dot_f16_group_n<2>(D, k, q, out, out_stride); break;
        case 3: dot_f16_group_n<3>(D, k, q, out, out_stride); break;
        case 4: dot_f16_group_n<4>(D, k, q, out, out_stride); break;
        case 5: dot_f16_group_n<5>(D, k, q, out, out_stride); break;
        case 6: dot_f16_group_n<6>(D, k, q, out, out_stride); break;
        case 7: dot_f16_group_n<7>(D, k, q, out, out_stride); break;
        case 8: dot_f16_group_n<8>(D, k, q, out, out_stride); break;
        default: GGML_ABORT("arkv: a GQA group of %d is read per query", (int) n_q);
    }
}
#endif

//
// the queries
//

// the queries in the types the dot products take: f32 for O rows read per GQA group (AVX2), else f16 as
// llama.cpp's flash attention takes them; the LO type's vec_dot_type (q8_0 for q4_0) for LO rows, which are
// then read as they are
struct query_rows {
    std::vector<float> f32;       // [n_tok*n_head][D]
    std::vector<ggml_fp16_t> f16; // [n_tok*n_head][D]
    std::vector<char> lo;         // [n_tok*n_head][row_lo]
    size_t row_lo = 0;
};

void convert_queries(const ggml_tensor * q, const ggml_type_traits_cpu * tr_klo, query_rows & qr) {
    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    qr.row_lo = tr_klo ? ggml_row_size(tr_klo->vec_dot_type, D) : 0;
    qr.f32.resize(n_tok*n_head*D);
    qr.f16.resize(n_tok*n_head*D);
    qr.lo.resize(n_tok*n_head*qr.row_lo);
    const auto * tr_f16 = ggml_get_type_traits_cpu(GGML_TYPE_F16);
    const auto * tr_dot = tr_klo ? ggml_get_type_traits_cpu(tr_klo->vec_dot_type) : nullptr;
    for (int64_t t = 0; t < n_tok; ++t) {
        for (int64_t h = 0; h < n_head; ++h) {
            const float * src = (const float *) ((const char *) q->data + h*q->nb[1] + t*q->nb[2]);
            const int64_t r = t*n_head + h;
            memcpy(qr.f32.data() + r*D, src, D*sizeof(float));
            tr_f16->from_float(src, qr.f16.data() + r*D, D);
            if (tr_dot) {
                tr_dot->from_float(src, qr.lo.data() + r*qr.row_lo, D);
            }
        }
    }
}

// a thread's scratch for one op call
struct scratch {
    query_rows qr;
    std::vector<float> mask; // [n_tok][chunk keys]
    std::vector<float> s;    // [n_rows][chunk keys]: logits, then exp(s - M)
    std::vector<float> vf;   // [v_group][H*D]: V rows in f32
    std::vector<float> fac;  // combine: [n_chunk][n_sel*n_head] exp(M_c - m)/l
    std::vector<float> t1, t2;
};

//
// split-K pass
//

// where key j lies: keys [0, n_lo) are LO rows, [n_lo, n_lo + n_s) S rows (both of the quantized type),
// then O rows
struct key_rows {
    const ggml_tensor * k_lo = nullptr, * v_lo = nullptr;
    const ggml_tensor * k_s  = nullptr, * v_s  = nullptr;
    const ggml_tensor * k_o  = nullptr, * v_o  = nullptr;
    int64_t n_lo = 0;
    int64_t n_s  = 0;

    // src: q, k_o, v_o, mask[, k_lo, v_lo][, k_s, v_s]
    key_rows(const ggml_tensor * dst, const llama_arkv_attn_params * p) : n_lo(p->n_lo), n_s(p->n_s) {
        k_o = dst->src[1];
        v_o = dst->src[2];
        int i = 4;
        if (n_lo > 0) {
            k_lo = dst->src[i++];
            v_lo = dst->src[i++];
        }
        if (n_s > 0) {
            k_s = dst->src[i++];
            v_s = dst->src[i++];
        }
    }
    bool quantized(int64_t j) const { return j < n_lo + n_s; }
    const ggml_tensor * k_q() const { return k_lo ? k_lo : k_s; } // the quantized type's pools (or null)
    const ggml_tensor * v_q() const { return v_lo ? v_lo : v_s; }
    const char * row(const ggml_tensor * lo, const ggml_tensor * s, const ggml_tensor * o, int64_t j) const {
        if (j < n_lo) {
            return (const char *) lo->data + j*lo->nb[1];
        }
        if (j < n_lo + n_s) {
            return (const char *) s->data + (j - n_lo)*s->nb[1];
        }
        return (const char *) o->data + (j - n_lo - n_s)*o->nb[1];
    }
    const char * k(int64_t j) const { return row(k_lo, k_s, k_o, j); }
    const char * v(int64_t j) const { return row(v_lo, v_s, v_o, j); }
};

// Per chunk of keys, in three sweeps: the logits of every key (K rows read as they are), the chunk's max and
// one exp per key and query row, then the V rows read once each and added with those weights. Within a
// chunk no running max is rescaled: the chunks are short (n_kv/n_chunk keys) and their scratch stays in cache.
void arkv_attn_partial(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(userdata);
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(dst);
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * mask = dst->src[3];
    const key_rows kr(dst, p);
    const ggml_tensor * k_o  = kr.k_o;
    const ggml_tensor * k_q  = kr.k_q();
    const ggml_tensor * v_q  = kr.v_q();

    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    const int64_t H      = k_o->ne[0]/D;
    const int64_t G      = n_head/H;
    const int64_t n_rows = n_tok*n_head;
    const int64_t n_kv   = p->n_lo + p->n_s + p->n_o;
    const int64_t sel0   = n_tok - p->n_sel; // first scored query
    const int64_t n_max  = (n_kv + p->n_chunk - 1)/p->n_chunk; // most keys in a chunk

    const part_view pv = { n_rows, D, (float *) dst->data };
    float * probs = pv.m(p->n_chunk); // [n_sel*n_head][n_kv]

    const auto * tr_f16 = ggml_get_type_traits_cpu(GGML_TYPE_F16);
    const auto * tr_klo = k_q ? ggml_get_type_traits_cpu(k_q->type) : nullptr;
    const row_reader read_v_lo = v_q ? make_reader(v_q->type) : row_reader();
    const row_reader read_v_o  = make_reader(GGML_TYPE_F16);
    const size_t k_head_lo = k_q ? ggml_row_size(k_q->type, D) : 0;
    const size_t k_head_o  = D*sizeof(ggml_fp16_t);
#ifdef ARKV_ATTN_AVX2
    const bool k_grouped = k_q && k_q->type == GGML_TYPE_Q4_0 && tr_klo->vec_dot_type == GGML_TYPE_Q8_0 &&
                           G <= dot_group_max;
    const bool o_grouped = G <= dot_group_max && D % 8 == 0;
#endif

    scratch sc;
    if (ith < p->n_chunk) {
        convert_queries(q, tr_klo, sc.qr);
    }
    sc.mask.resize(n_tok*n_max);
    sc.s.resize(n_rows*n_max);
    sc.vf.resize(v_group*H*D);
    const query_rows & qr = sc.qr;

    for (int64_t c = ith; c < p->n_chunk; c += nth) {
        float * M   = pv.m(c);
        float * S   = pv.s(c);
        float * acc = pv.acc(c);
        std::fill_n(acc, n_rows*D, 0.0f);

        const int64_t j0 = chunk_begin(n_kv, p->n_chunk, c);
        const int64_t n  = chunk_begin(n_kv, p->n_chunk, c + 1) - j0;
        float * s  = sc.s.data();  // [n_rows][n]
        float * mv = sc.mask.data(); // [n_tok][n]

        // this chunk's mask columns, in f32
        for (int64_t t = 0; t < n_tok; ++t) {
            const char * row = (const char *) mask->data + t*mask->nb[1] + (p->start + j0)*ggml_element_size(mask);
            if (mask->type == GGML_TYPE_F16) {
                ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, mv + t*n, n);
            } else {
                memcpy(mv + t*n, row, n*sizeof(float));
            }
        }

        // 1. scaled logits, -inf where the mask hides the key
        for (int64_t jj = 0; jj < n; ++jj) {
            const int64_t j = j0 + jj;
            const bool is_lo = kr.quantized(j); // an LO or S row
            const auto * tr = is_lo ? tr_klo : tr_f16;
            const char * k_row = kr.k(j);
            const size_t k_head = is_lo ? k_head_lo : k_head_o;
            for (int64_t t = 0; t < n_tok; ++t) {
                const float m = mv[t*n + jj];
                float * st = s + t*n_head*n + jj;
                if (m == -INFINITY) {
                    for (int64_t h = 0; h < n_head; ++h) {
                        st[h*n] = -INFINITY;
                    }
                    continue;
                }
#ifdef ARKV_ATTN_AVX2
                // q4_0 rows: one call per KV head for its GQA group (the query rows t*n_head + hk*G + g)
                if (is_lo && k_grouped) {
                    for (int64_t hk = 0; hk < H; ++hk) {
                        dot_q4_0_group(D, k_row + hk*k_head, qr.lo.data() + (t*n_head + hk*G)*qr.row_lo, qr.row_lo, G,
                                       st + hk*G*n, n);
                    }
                    for (int64_t h = 0; h < n_head; ++h) {
                        st[h*n] = st[h*n]*p->scale + m;
                    }
                    continue;
                }
                // f16 rows: likewise, in f32
                if (!is_lo && o_grouped) {
                    for (int64_t hk = 0; hk < H; ++hk) {
                        dot_f16_group(D, (const ggml_fp16_t *) (k_row + hk*k_head), qr.f32.data() + (t*n_head + hk*G)*D, G,
                                      st + hk*G*n, n);
                    }
                    for (int64_t h = 0; h < n_head; ++h) {
                        st[h*n] = st[h*n]*p->scale + m;
                    }
                    continue;
                }
#endif
                for (int64_t h = 0; h < n_head; ++h) {
                    const int64_t r = t*n_head + h;
                    const void * qv = is_lo ? (const void *) (qr.lo.data() + r*qr.row_lo) : (const void *) (qr.f16.data() + r*D);
                    float dot;
                    tr->vec_dot(D, &dot, 0, k_row + (h/G)*k_head, 0, qv, 0, 1);
                    st[h*n] = dot*p->scale + m;
                }
            }
        }

        // 2. the chunk's max and sum per query row; s becomes exp(s - M), 0 where hidden
        for (int64_t r = 0; r < n_rows; ++r) {
            float * sr = s + r*n;
            float m = -INFINITY;
            for (int64_t jj = 0; jj < n; ++jj) {
                m = std::max(m, sr[jj]);
            }
            M[r] = m;
            if (m == -INFINITY) {
                std::fill_n(sr, n, 0.0f);
                S[r] = 0.0f;
            } else {
                S[r] = exp_sub_sum(sr, n, m);
            }
        }

        // 3. V rows, each read once, into every query row that sees the key: visible keys in groups of
        //    v_group, so that each row's accumulator is loaded and stored once per group, not once per key
        //    (f16 rows are read where they lie when the whole group is f16, with AVX2)
        for (int64_t jj = 0; jj < n; ) {
            int64_t keys[v_group];
            const ggml_fp16_t * v_f16[v_group] = {}; // f16 rows not converted into sc.vf (yet)
            int64_t nk = 0;
            bool all_f16 = true;
            for (; jj < n && nk < v_group; ++jj) {
                bool any = false;
                for (int64_t t = 0; t < n_tok; ++t) {
                    any = any || mv[t*n + jj] != -INFINITY;
                }
                if (!any) {
                    continue;
                }
                const int64_t j = j0 + jj;
                if (kr.quantized(j)) {
                    read_v_lo(kr.v(j), sc.vf.data() + nk*H*D, H*D);
                    all_f16 = false;
                } else {
                    v_f16[nk] = (const ggml_fp16_t *) kr.v(j);
                }
                keys[nk++] = jj;
            }
#ifdef ARKV_ATTN_AVX2
            if (all_f16 && D % 8 == 0) {
                add_f16_keys(acc, s, n, keys, v_f16, nk, n_tok, n_head, H, D);
                continue;
            }
#endif
            for (int64_t k = 0; k < nk; ++k) {
                if (v_f16[k]) {
                    read_v_o(v_f16[k], sc.vf.data() + k*H*D, H*D);
                }
            }
            for (int64_t r = 0; r < n_rows; ++r) {
                float w[v_group];
                for (int64_t k = 0; k < nk; ++k) {
                    w[k] = s[r*n + keys[k]];
                }
                axpy_group(acc + r*D, sc.vf.data() + ((r % n_head)/G)*D, H*D, w, nk, D);
            }
        }

        // 4. the scored queries' exp(s - M_c), turned into probabilities by the combine
        for (int64_t i = 0; i < p->n_sel*n_head; ++i) {
            memcpy(probs + i*n_kv + j0, s + (sel0*n_head + i)*n, n*sizeof(float));
        }
    }
}

//
// combine pass
//

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

// KV head hk's sums of p and p^2 over keys [k0, k1) (t1, t2) into the accumulators of their pools: dst's
// src[1] acc_o[, acc_lo][, acc_s], keys [LO rows | S rows | O rows]
void add_to_accumulators(const ggml_tensor * dst, const llama_arkv_attn_params * p, int64_t hk, int64_t k0, int64_t k1,
                         const float * t1, const float * t2) {
    ggml_tensor * acc_o  = dst->src[1];
    ggml_tensor * acc_lo = p->n_lo > 0 ? dst->src[2] : nullptr;
    ggml_tensor * acc_s  = p->n_s > 0 ? dst->src[p->n_lo > 0 ? 3 : 2] : nullptr;
    for (int64_t j = k0; j < k1; ++j) {
        const float s1 = t1[j - k0];
        if (s1 == 0.0f) {
            continue; // hidden to every scored query (padding slots included: nothing is written there)
        }
        ggml_tensor * acc = j < p->n_lo ? acc_lo : j < p->n_lo + p->n_s ? acc_s : acc_o;
        const int64_t slot = j < p->n_lo ? j : j < p->n_lo + p->n_s ? j - p->n_lo : j - p->n_lo - p->n_s;
        char * a = (char *) acc->data + hk*acc->nb[0] + slot*acc->nb[1];
        *(float *) a += s1;
        *(float *) (a + acc->nb[2]) += t2[j - k0];
    }
}

// the scored queries' attention probabilities, summed over them and the GQA group, into the accumulators
// (src[1] acc_o[, acc_lo][, acc_s]): p = exp(s - M_c) * exp(M_c - m)/l, the second factor once per chunk and
// row; every thread needs those factors; keys are split over threads
void accumulate_scores(ggml_tensor * dst, const llama_arkv_attn_params * p, const part_view & pv, int ith, int nth) {
    if (p->n_sel == 0) {
        return;
    }
    const int64_t n_head = p->n_head;
    const int64_t n_tok  = dst->ne[1];
    const int64_t n_kv   = p->n_lo + p->n_s + p->n_o;
    const int64_t sel0   = n_tok - p->n_sel;
    const int64_t n_scored = p->n_sel*n_head;
    const int64_t H = dst->src[1]->ne[0];
    const int64_t G = n_head/H;
    const float * probs = pv.m(p->n_chunk);

    scratch sc;
    sc.fac.resize(p->n_chunk*n_scored);
    for (int64_t i = 0; i < n_scored; ++i) {
        const int64_t r = sel0*n_head + i;
        float m, l;
        row_final(pv, p->n_chunk, r, m, l);
        for (int64_t c = 0; c < p->n_chunk; ++c) {
            sc.fac[c*n_scored + i] = l > 0.0f && pv.s(c)[r] > 0.0f ? expf(pv.m(c)[r] - m)/l : 0.0f;
        }
    }

    // this thread's keys [k0, k1), walked chunk by chunk (one factor per chunk and row)
    const int64_t k0 = n_kv*ith/nth;
    const int64_t k1 = n_kv*(ith + 1)/nth;
    sc.t1.resize(k1 - k0);
    sc.t2.resize(k1 - k0);
    for (int64_t hk = 0; hk < H; ++hk) {
        std::fill(sc.t1.begin(), sc.t1.end(), 0.0f);
        std::fill(sc.t2.begin(), sc.t2.end(), 0.0f);
        for (int64_t c = 0; c < p->n_chunk; ++c) {
            const int64_t a = std::max(k0, chunk_begin(n_kv, p->n_chunk, c));
            const int64_t b = std::min(k1, chunk_begin(n_kv, p->n_chunk, c + 1));
            if (a >= b) {
                continue;
            }
            for (int64_t ts = 0; ts < p->n_sel; ++ts) {
                for (int64_t h = hk*G; h < (hk + 1)*G; ++h) {
                    const int64_t i = ts*n_head + h;
                    const float f = sc.fac[c*n_scored + i];
                    if (f == 0.0f) {
                        continue;
                    }
                    const float * pr = probs + i*n_kv;
                    float * t1 = sc.t1.data() - k0;
                    float * t2 = sc.t2.data() - k0;
                    for (int64_t j = a; j < b; ++j) {
                        const float x = pr[j]*f;
                        t1[j] += x;
                        t2[j] += x*x;
                    }
                }
            }
        }
        add_to_accumulators(dst, p, hk, k0, k1, sc.t1.data(), sc.t2.data());
    }
}

// src: part[, acc_o[, acc_lo][, acc_s]]
void arkv_attn_combine(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(userdata);
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(dst);
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
            axpy(out, pv.acc(c) + r*D, expf(pv.m(c)[r] - m)/l, D);
        }
    }

    accumulate_scores(dst, p, pv, ith, nth);
}

//
// scores of llama.cpp's attention (a prompt's ubatches)
//

// src: p [n_kv_p, n_sel, n_head] (F32, contiguous), acc_o[, acc_lo][, acc_s]: p and p^2 summed over the queries
// and the GQA group in one pass (keys split over threads), as accumulate_scores does for the fused attention
void arkv_scores(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(userdata);
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(dst);
    const ggml_tensor * probs = dst->src[0];
    const int64_t n_sel  = probs->ne[1];
    const int64_t n_head = probs->ne[2];
    const int64_t H = dst->src[1]->ne[0];
    const int64_t G = n_head/H;
    const int64_t n_kv = p->n_lo + p->n_s + p->n_o;
    const int64_t k0 = n_kv*ith/nth;
    const int64_t k1 = n_kv*(ith + 1)/nth;
    if (k0 >= k1) {
        return;
    }
    std::vector<float> t1(k1 - k0), t2(k1 - k0);
    for (int64_t hk = 0; hk < H; ++hk) {
        std::fill(t1.begin(), t1.end(), 0.0f);
        std::fill(t2.begin(), t2.end(), 0.0f);
        for (int64_t ts = 0; ts < n_sel; ++ts) {
            for (int64_t h = hk*G; h < (hk + 1)*G; ++h) {
                const float * pr = (const float *) ((const char *) probs->data + ts*probs->nb[1] + h*probs->nb[2]) + k0;
                for (int64_t j = 0; j < k1 - k0; ++j) {
                    t1[j] += pr[j];
                    t2[j] += pr[j]*pr[j];
                }
            }
        }
        add_to_accumulators(dst, p, hk, k0, k1, t1.data(), t2.data());
    }
}

//
// V^T for llama.cpp's attention without flash attention
//

// src: the row sets (each [D*H, n_i], any type a row reader takes), keys in their order; dst F16 [n_kv, D*H]: row c
// holds value c of every key. Blocks of keys over threads: each block's rows are dequantized into a tile, then
// written a column at a time (one cache line of f16 per block and value), where ggml's transposed copy goes
// element by element
void arkv_rows_t(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(userdata);
    constexpr int64_t n_blk = 32; // keys per block: 64 bytes of f16 per value
    const int64_t n_kv = dst->ne[0];
    const int64_t DH   = dst->ne[1];

    int n_src = 0;
    const ggml_tensor * src[GGML_MAX_SRC];
    row_reader read[GGML_MAX_SRC];
    int64_t end[GGML_MAX_SRC]; // keys before the end of each row set
    for (int i = 0; i < GGML_MAX_SRC && dst->src[i]; ++i, ++n_src) {
        src[i]  = dst->src[i];
        read[i] = make_reader(src[i]->type);
        end[i]  = (i > 0 ? end[i - 1] : 0) + src[i]->ne[1];
    }
    GGML_ASSERT(n_src > 0 && end[n_src - 1] == n_kv);

    std::vector<float> tile(n_blk*DH);
    float col[n_blk];
    for (int64_t j0 = ith*n_blk; j0 < n_kv; j0 += nth*n_blk) {
        const int64_t n = std::min(n_blk, n_kv - j0);
        int i = 0;
        for (int64_t jj = 0; jj < n; ++jj) {
            const int64_t j = j0 + jj;
            while (j >= end[i]) {
                ++i;
            }
            const int64_t r = j - (i > 0 ? end[i - 1] : 0);
            read[i]((const char *) src[i]->data + r*src[i]->nb[1], tile.data() + jj*DH, DH);
        }
        for (int64_t c = 0; c < DH; ++c) {
            for (int64_t jj = 0; jj < n; ++jj) {
                col[jj] = tile[jj*DH + c];
            }
            ggml_cpu_fp32_to_fp16(col, (ggml_fp16_t *) ((char *) dst->data + c*dst->nb[1]) + j0, n);
        }
    }
}

// gives op its copy of p, after ggml's own custom op params (fun, n_tasks, userdata)
ggml_tensor * with_params(ggml_tensor * op, const llama_arkv_attn_params & p) {
    static_assert(3*sizeof(void *) <= LLAMA_ARKV_ATTN_PARAMS_OFFS, "ggml_custom_op_params fits before the params");
    memcpy((char *) op->op_params + LLAMA_ARKV_ATTN_PARAMS_OFFS, &p, sizeof(p));
    return op;
}

} // namespace

bool llama_arkv_attn_bind_device(ggml_backend_dev_t dev) {
    using bind_fn = bool (*)(const char * name, ggml_custom_op_t fun);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    const auto bind = reg ? (bind_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_custom_op_bind") : nullptr;
    return bind && bind("arkv_attn_partial", arkv_attn_partial) && bind("arkv_attn_combine", arkv_attn_combine);
}

ggml_tensor * llama_arkv_rows_t_cpu(ggml_context * ctx, ggml_tensor * const * parts, int n_parts) {
    ggml_tensor * args[GGML_MAX_SRC];
    int n = 0;
    int64_t n_kv = 0;
    for (int i = 0; i < n_parts; ++i) {
        if (parts[i] && parts[i]->ne[1] > 0) {
            GGML_ASSERT(n < GGML_MAX_SRC && parts[i]->ne[2] == 1 && parts[i]->ne[3] == 1);
            GGML_ASSERT(n == 0 || parts[i]->ne[0] == args[0]->ne[0]);
            GGML_ASSERT(parts[i]->nb[0] == ggml_type_size(parts[i]->type)); // rows as ggml lays them out
            args[n++] = parts[i];
            n_kv += parts[i]->ne[1];
        }
    }
    GGML_ASSERT(n > 0);
    return ggml_custom_4d(ctx, GGML_TYPE_F16, n_kv, args[0]->ne[0], 1, 1, args, n, arkv_rows_t, GGML_N_TASKS_MAX, nullptr);
}

ggml_tensor * llama_arkv_scores_cpu(ggml_context * ctx, ggml_tensor * probs, const llama_arkv_attn_rows & lo,
                                    const llama_arkv_attn_rows & s, const llama_arkv_attn_rows & o,
                                    const llama_arkv_attn_params & p) {
    GGML_ASSERT(o.acc && (p.n_lo == 0 || lo.acc) && (p.n_s == 0 || s.acc));
    GGML_ASSERT(probs->type == GGML_TYPE_F32 && ggml_is_contiguous(probs));
    GGML_ASSERT(probs->ne[0] >= p.n_lo + p.n_s + p.n_o && probs->ne[2] % o.acc->ne[0] == 0);
    ggml_tensor * args[4] = { probs, o.acc };
    int n = 2;
    if (p.n_lo > 0) {
        args[n++] = lo.acc;
    }
    if (p.n_s > 0) {
        args[n++] = s.acc;
    }
    return with_params(ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, n, arkv_scores, GGML_N_TASKS_MAX, nullptr), p);
}

ggml_tensor * llama_arkv_attn_cpu(ggml_context * ctx, ggml_tensor * q, const llama_arkv_attn_rows & lo,
                                  const llama_arkv_attn_rows & s, const llama_arkv_attn_rows & o, ggml_tensor * mask,
                                  const llama_arkv_attn_params & p) {
    const int64_t D      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_tok  = q->ne[2];
    const int64_t n_kv   = p.n_lo + p.n_s + p.n_o;
    GGML_ASSERT(q->type == GGML_TYPE_F32 && o.k->type == GGML_TYPE_F16 && o.v->type == GGML_TYPE_F16);
    GGML_ASSERT(p.n_head == n_head && o.k->ne[0] % D == 0 && n_head % (o.k->ne[0]/D) == 0);
    GGML_ASSERT(p.n_sel >= 0 && p.n_sel <= n_tok && p.n_chunk >= 1 && n_kv > 0);
    GGML_ASSERT(p.n_lo == 0 || (lo.k && lo.v && lo.k->type == lo.v->type));
    GGML_ASSERT(p.n_s == 0 || (s.k && s.v && s.k->type == s.v->type));
    GGML_ASSERT(p.n_lo == 0 || p.n_s == 0 || lo.k->type == s.k->type); // one quantized type
    GGML_ASSERT(p.n_sel == 0 || (o.acc && (p.n_lo == 0 || lo.acc) && (p.n_s == 0 || s.acc)));
    GGML_ASSERT(mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32);
    // the V readers work per block of 32 (the block layouts above are checked against ggml's)
    if (p.n_lo > 0 || p.n_s > 0) {
        const ggml_type type_q = (p.n_lo > 0 ? lo : s).v->type;
        GGML_ASSERT(D % ggml_blck_size(type_q) == 0);
        switch (type_q) {
            case GGML_TYPE_Q4_0: GGML_ASSERT(ggml_type_size(type_q) == sizeof(block_q4_0_view)); break;
            case GGML_TYPE_Q4_1: GGML_ASSERT(ggml_type_size(type_q) == sizeof(block_q4_1_view)); break;
            case GGML_TYPE_Q8_0: GGML_ASSERT(ggml_type_size(type_q) == sizeof(block_q8_0_view)); break;
            default: break;
        }
    }

    ggml_tensor * args_a[8] = { q, o.k, o.v, mask };
    int n_a = 4;
    if (p.n_lo > 0) {
        args_a[n_a++] = lo.k;
        args_a[n_a++] = lo.v;
    }
    if (p.n_s > 0) {
        args_a[n_a++] = s.k;
        args_a[n_a++] = s.v;
    }
    // per chunk [M | S | acc] per (query, head), the scored queries' values per key, and [max | sum] per (query, head)
    // (a device's combine writes it: ggml-cuda-arkv.cu)
    const int64_t n_part = p.n_chunk*n_tok*n_head*(D + 2) + p.n_sel*n_head*n_kv + 2*n_tok*n_head;
    ggml_tensor * part = with_params(ggml_custom_4d(ctx, GGML_TYPE_F32, n_part, 1, 1, 1, args_a, n_a, arkv_attn_partial,
                                                    GGML_N_TASKS_MAX, nullptr), p);

    ggml_tensor * args_b[4] = { part };
    int n_b = 1;
    if (p.n_sel > 0) {
        args_b[n_b++] = o.acc;
        if (p.n_lo > 0) {
            args_b[n_b++] = lo.acc;
        }
        if (p.n_s > 0) {
            args_b[n_b++] = s.acc;
        }
    }
    return with_params(ggml_custom_4d(ctx, GGML_TYPE_F32, D*n_head, n_tok, 1, 1, args_b, n_b, arkv_attn_combine,
                                      GGML_N_TASKS_MAX, nullptr), p);
}

#else // the CPU backend is not linked into libllama (GGML_BACKEND_DL): the dequantizing path only

bool llama_arkv_attn_cpu_available() {
    return false;
}

bool llama_arkv_attn_bind_device(ggml_backend_dev_t) {
    return false;
}

ggml_tensor * llama_arkv_attn_cpu(ggml_context *, ggml_tensor *, const llama_arkv_attn_rows &, const llama_arkv_attn_rows &,
                                  const llama_arkv_attn_rows &, ggml_tensor *, const llama_arkv_attn_params &) {
    GGML_ABORT("arkv: the fused CPU attention is not built in");
}

ggml_tensor * llama_arkv_scores_cpu(ggml_context *, ggml_tensor *, const llama_arkv_attn_rows &, const llama_arkv_attn_rows &,
                                    const llama_arkv_attn_rows &, const llama_arkv_attn_params &) {
    GGML_ABORT("arkv: the CPU scores are not built in");
}

ggml_tensor * llama_arkv_rows_t_cpu(ggml_context *, ggml_tensor * const *, int) {
    GGML_ABORT("arkv: the CPU transpose is not built in");
}

#endif
