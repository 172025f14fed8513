// The fused decode attention's kernels (ggml-cuda-arkv.cu runs them on ggml-cuda's stream), and their host side:
// which ops they take, and the launches from an op's tensors and params. Written against a few CUDA primitives
// only (common.cuh's warp reductions, __shfl_xor_sync, half conversions, the thread and block indices,
// __syncthreads and arkv_smem(), the dynamic shared memory), so that tests/cuda_emu.cpp compiles the same
// code for the CPU, with one OS thread per CUDA thread, and checks it against numpy
// (tests/test_cuda_kernels.py).
//
// The fused attention (llama-arkv-attn-cpu.h) on device pools: one pass over a layer's q4_0 (q4_1, q8_0) LO
// rows and its f16 O rows, read where they lie, for the few queries of a decoded ubatch, and the scored
// queries' attention added to the heavy-hitter accumulators on the way. The segments path it replaces reads
// the LO rows twice (flash attention, then the logits for the merge weight and the scores) in ~20 graph nodes
// per layer (docs/GPU.md, first run). Two ops, as on the CPU:
//   partial: one block per (chunk of keys, KV head), all query heads of its GQA group and all queries:
//            logits (8 lanes per key), an online softmax over tiles of keys, V added in registers; writes the
//            chunk's max, sum and weighted V per (query, head), and the scored queries' logits;
//   combine: the output (one block per (query, head)) and that row's final max and sum, then the scores
//            (one thread per key: p and p^2 summed over the scored queries and the group, added in place).
// The partial tensor's layout is the CPU op's (llama_arkv_attn_cpu sizes it), except that the scored region
// holds logits here (exp(s - M_c) on the CPU) and the [max | sum] region after it is used here only.
#pragma once

#include "llama-arkv-attn-cpu.h"

#ifndef ARKV_CUDA_EMU
// the block's dynamic shared memory
static __device__ __forceinline__ float * arkv_smem() {
    extern __shared__ float arkv_smem_buf[];
    return arkv_smem_buf;
}
#endif

static constexpr int ARKV_KT    = 64;  // keys per tile of the partial kernel (its logits sit in shared memory)
static constexpr int ARKV_D_MAX = 256; // head sizes up to this (one thread per element in the V sums)
static constexpr int ARKV_L     = 8;   // lanes per key in the logits (a power of 2): D/8 elements each
static constexpr int ARKV_KPW   = WARP_SIZE/ARKV_L; // keys a warp takes at once
static constexpr int ARKV_R_MAX = 32;  // (query, head of the group) rows per block: n_tokens*G

// element e of a row of one head, of type type (f16 or the LO types)
static __device__ __forceinline__ float arkv_load(const char * row, const int type, const int e) {
    switch (type) {
        case GGML_TYPE_F16:
            return __half2float(((const half *) row)[e]);
        case GGML_TYPE_Q4_0: {
            const block_q4_0 * b = (const block_q4_0 *) row + e/QK4_0;
            const int i = e % QK4_0;
            const int q = i < QK4_0/2 ? b->qs[i] & 0x0F : b->qs[i - QK4_0/2] >> 4;
            return (q - 8)*__half2float(b->d);
        }
        case GGML_TYPE_Q4_1: {
            const block_q4_1 * b = (const block_q4_1 *) row + e/QK4_1;
            const int i = e % QK4_1;
            const int q = i < QK4_1/2 ? b->qs[i] & 0x0F : b->qs[i - QK4_1/2] >> 4;
            const float2 dm = __half22float2(b->dm);
            return q*dm.x + dm.y;
        }
        case GGML_TYPE_Q8_0: {
            const block_q8_0 * b = (const block_q8_0 *) row + e/QK8_0;
            return b->qs[e % QK8_0]*__half2float(b->d);
        }
        default:
            return 0.0f; // excluded by arkv_attn_partial_supported
    }
}

// the sum of x over the ARKV_L lanes of a key's group (every lane of the warp takes part)
static __device__ __forceinline__ float arkv_group_sum(float x) {
#pragma unroll
    for (int offset = ARKV_L/2; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, offset);
    }
    return x;
}

struct arkv_rows {
    const char * k = nullptr;
    const char * v = nullptr;
    size_t k_nb1  = 0; // bytes per row of H heads
    size_t v_nb1  = 0;
    size_t head   = 0; // bytes per head
    int    type   = GGML_TYPE_F16;
};

struct arkv_partial_args {
    const char * q;     // F32 [D, n_head, n_tok]
    size_t q_nb1, q_nb2;
    arkv_rows lo, o;    // keys [0, n_lo) are LO rows, then O rows
    const char * mask;  // [n_mask, n_tok], F16 or F32
    size_t mask_nb1;
    bool   mask_f16;
    int    start;       // the layer's first mask column
    float  scale;
    int    D, n_head, G, n_tok, n_lo, n_kv, n_chunk, sel0;
    float * part;
};

// per chunk c: [M | S | acc] over the n_rows = n_tok*n_head rows, then the scored logits [n_sel*n_head][n_kv]
template <typename T>
static __device__ __forceinline__ T * arkv_part_chunk(T * part, int64_t n_rows, int D, int64_t c) {
    return part + c*n_rows*(D + 2);
}

// RMAX >= R = n_tok*G rows per block: their V sums stay in registers; EMAX >= D/ARKV_L: a key's elements per lane
template <int RMAX, int EMAX>
static __global__ void arkv_attn_partial_kernel(const arkv_partial_args a) {
    const int c    = blockIdx.x;
    const int hk   = blockIdx.y;
    const int tid  = threadIdx.x;     // blockDim.x == D
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    const int D = a.D;
    const int G = a.G;
    const int R = a.n_tok*G;          // local row lr = t*G + g: query t, head hk*G + g
    const int64_t n_rows = (int64_t) a.n_tok*a.n_head;

    float * qs   = arkv_smem();       // [R][D]
    float * s    = qs + R*D;          // [R][ARKV_KT]: logits, then exp(s - M)
    float * rowM = s + R*ARKV_KT;     // [R] running max
    float * rowS = rowM + R;          // [R] running sum
    float * rowA = rowS + R;          // [R] this tile's rescale of the V sums
    int   * vis  = (int *) (rowA + R);// [ARKV_KT] key visible to some query

    for (int i = tid; i < R*D; i += blockDim.x) {
        const int lr = i / D;
        const int t = lr / G;
        const int h = hk*G + lr % G;
        qs[i] = *(const float *) (a.q + h*a.q_nb1 + t*a.q_nb2 + (i % D)*sizeof(float));
    }
    for (int lr = tid; lr < R; lr += blockDim.x) {
        rowM[lr] = -INFINITY;
        rowS[lr] = 0.0f;
    }
    float acc[RMAX];
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
        acc[r] = 0.0f;
    }
    __syncthreads();

    const int64_t j0 = (int64_t) a.n_kv*c/a.n_chunk;
    const int64_t j1 = (int64_t) a.n_kv*(c + 1)/a.n_chunk;
    float * probs = arkv_part_chunk(a.part, n_rows, D, a.n_chunk);
    const int ne  = D / ARKV_L; // elements of a key per lane in the logits
    const int sub = lane % ARKV_L;

    for (int64_t jt = j0; jt < j1; jt += ARKV_KT) {
        const int nt = (int) (j1 - jt < ARKV_KT ? j1 - jt : ARKV_KT);

        // 1. logits: ARKV_L lanes per key, ARKV_KPW keys per warp at once; lane `sub` of a key holds its elements
        //    sub, sub + ARKV_L, ... (a group's lanes read adjacent bytes of a row, and adjacent floats of q)
        for (int jj0 = warp*ARKV_KPW; jj0 < nt; jj0 += n_warps*ARKV_KPW) {
            const int  jj    = jj0 + lane/ARKV_L;
            const bool valid = jj < nt; // past the tile's end: the lanes still take part in the sums
            const int64_t j  = jt + (valid ? jj : 0);
            const bool is_lo = j < a.n_lo;
            const arkv_rows & rs = is_lo ? a.lo : a.o;
            const char * k_row = rs.k + (is_lo ? j : j - a.n_lo)*rs.k_nb1 + hk*rs.head;
            float kv[EMAX];
#pragma unroll
            for (int i = 0; i < EMAX; ++i) {
                kv[i] = i < ne ? arkv_load(k_row, rs.type, i*ARKV_L + sub) : 0.0f;
            }
            bool any = false;
            for (int t = 0; t < a.n_tok; ++t) {
                const char * mrow = a.mask + t*a.mask_nb1;
                const float m = a.mask_f16 ? __half2float(((const half *) mrow)[a.start + j])
                                           : ((const float *) mrow)[a.start + j];
                for (int g = 0; g < G; ++g) {
                    const int lr = t*G + g;
                    float dot = 0.0f;
#pragma unroll
                    for (int i = 0; i < EMAX; ++i) {
                        if (i < ne) {
                            dot += kv[i]*qs[lr*D + i*ARKV_L + sub];
                        }
                    }
                    dot = arkv_group_sum(dot); // a hidden key's (a NaN padding row's) sum is never used
                    if (valid && sub == 0) {
                        const float val = m == -INFINITY ? -INFINITY : dot*a.scale + m;
                        s[lr*ARKV_KT + jj] = val;
                        if (t >= a.sel0) {
                            probs[((int64_t) (t - a.sel0)*a.n_head + hk*G + g)*a.n_kv + j] = val;
                        }
                    }
                }
                any = any || m != -INFINITY;
            }
            if (valid && sub == 0) {
                vis[jj] = any;
            }
        }
        __syncthreads();

        // 2. online softmax per row: the tile's max, exp(s - M), and the factor for the sums so far
        for (int lr = warp; lr < R; lr += n_warps) {
            float mx = -INFINITY;
            for (int jj = lane; jj < nt; jj += WARP_SIZE) {
                mx = fmaxf(mx, s[lr*ARKV_KT + jj]);
            }
            mx = warp_reduce_max(mx);
            const float m_old = rowM[lr];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int jj = lane; jj < nt; jj += WARP_SIZE) {
                const float x = s[lr*ARKV_KT + jj];
                const float e = m_new == -INFINITY || x == -INFINITY ? 0.0f : expf(x - m_new);
                s[lr*ARKV_KT + jj] = e;
                sum += e;
            }
            sum = warp_reduce_sum(sum);
            if (lane == 0) {
                const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                rowS[lr] = rowS[lr]*alpha + sum;
                rowM[lr] = m_new;
                rowA[lr] = alpha;
            }
        }
        __syncthreads();

        // 3. V: thread tid adds element tid of every visible key's row to the rows' sums
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            if (r < R) {
                acc[r] *= rowA[r];
            }
        }
        for (int jj = 0; jj < nt; ++jj) {
            if (!vis[jj]) {
                continue; // hidden to every query (a padding slot, a removed row): never read
            }
            const int64_t j = jt + jj;
            const bool is_lo = j < a.n_lo;
            const arkv_rows & rs = is_lo ? a.lo : a.o;
            const float v = arkv_load(rs.v + (is_lo ? j : j - a.n_lo)*rs.v_nb1 + hk*rs.head, rs.type, tid);
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                if (r < R) {
                    acc[r] += s[r*ARKV_KT + jj]*v;
                }
            }
        }
        __syncthreads();
    }

    float * M = arkv_part_chunk(a.part, n_rows, D, c);
    float * S = M + n_rows;
    float * V = M + 2*n_rows;
#pragma unroll
    for (int lr = 0; lr < RMAX; ++lr) {
        if (lr < R) {
            const int64_t r = (int64_t) (lr / G)*a.n_head + hk*G + lr % G;
            V[r*D + tid] = acc[lr];
            if (tid == 0) {
                M[r] = rowM[lr];
                S[r] = rowS[lr];
            }
        }
    }
}

// src: q, k_o, v_o, mask[, k_lo, v_lo]
static bool arkv_attn_partial_supported(const ggml_tensor * op) {
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(op);
    const ggml_tensor * q = op->src[0];
    const ggml_tensor * k_o = op->src[1];
    const ggml_tensor * v_o = op->src[2];
    const ggml_tensor * mask = op->src[3];
    if (!q || !k_o || !v_o || !mask || p->n_s != 0) {
        return false; // the spill lives in host memory: recall passes take another path
    }
    const int64_t D = q->ne[0];
    if (q->type != GGML_TYPE_F32 || k_o->type != GGML_TYPE_F16 || v_o->type != GGML_TYPE_F16 ||
        (mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) ||
        D % WARP_SIZE != 0 || D > ARKV_D_MAX || k_o->ne[0] % D != 0 || q->ne[1] % (k_o->ne[0]/D) != 0 ||
        q->ne[2]*(q->ne[1]/(k_o->ne[0]/D)) > ARKV_R_MAX) {
        return false;
    }
    if (p->n_lo > 0) {
        const ggml_tensor * k_lo = op->src[4];
        const ggml_tensor * v_lo = op->src[5];
        if (!k_lo || !v_lo || k_lo->type != v_lo->type ||
            (k_lo->type != GGML_TYPE_Q4_0 && k_lo->type != GGML_TYPE_Q4_1 && k_lo->type != GGML_TYPE_Q8_0) ||
            D % ggml_blck_size(k_lo->type) != 0) {
            return false;
        }
    }
    return true;
}

// the partial kernel for R rows per block, with RMAX the next of 4, 8, 16, 32
template <int EMAX, typename L>
static void arkv_attn_partial_launch(int R, dim3 grid, dim3 block, size_t smem, const arkv_partial_args & a, L && launch) {
    if (R <= 4) {
        launch(arkv_attn_partial_kernel<4, EMAX>, grid, block, smem, a);
    } else if (R <= 8) {
        launch(arkv_attn_partial_kernel<8, EMAX>, grid, block, smem, a);
    } else if (R <= 16) {
        launch(arkv_attn_partial_kernel<16, EMAX>, grid, block, smem, a);
    } else {
        launch(arkv_attn_partial_kernel<32, EMAX>, grid, block, smem, a);
    }
}

// launch(kernel, grid, block, smem bytes, args) runs kernel<<<grid, block, smem>>>(args) (on the backend's stream)
template <typename L>
static void arkv_attn_partial_run(ggml_tensor * dst, L && launch) {
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(dst);
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k_o = dst->src[1];
    const ggml_tensor * v_o = dst->src[2];
    const ggml_tensor * mask = dst->src[3];

    const int D = (int) q->ne[0];
    const int n_head = (int) q->ne[1];
    const int n_tok = (int) q->ne[2];
    const int H = (int) (k_o->ne[0]/D);
    const int G = n_head/H;
    const int R = n_tok*G;
    GGML_ASSERT(R <= ARKV_R_MAX && D % WARP_SIZE == 0 && D <= ARKV_D_MAX && p->n_s == 0);
    GGML_ASSERT(p->n_sel <= n_tok && p->n_chunk >= 1 && p->n_lo + p->n_o > 0);

    arkv_partial_args a = {};
    a.q = (const char *) q->data;
    a.q_nb1 = q->nb[1];
    a.q_nb2 = q->nb[2];
    a.o = { (const char *) k_o->data, (const char *) v_o->data, k_o->nb[1], v_o->nb[1], D*sizeof(half), GGML_TYPE_F16 };
    if (p->n_lo > 0) {
        const ggml_tensor * k_lo = dst->src[4];
        const ggml_tensor * v_lo = dst->src[5];
        a.lo = { (const char *) k_lo->data, (const char *) v_lo->data, k_lo->nb[1], v_lo->nb[1],
                 ggml_row_size(k_lo->type, D), k_lo->type };
    }
    a.mask = (const char *) mask->data;
    a.mask_nb1 = mask->nb[1];
    a.mask_f16 = mask->type == GGML_TYPE_F16;
    a.start = p->start;
    a.scale = p->scale;
    a.D = D;
    a.n_head = n_head;
    a.G = G;
    a.n_tok = n_tok;
    a.n_lo = p->n_lo;
    a.n_kv = p->n_lo + p->n_o;
    a.n_chunk = p->n_chunk;
    a.sel0 = n_tok - p->n_sel;
    a.part = (float *) dst->data;

    const dim3 grid(p->n_chunk, H);
    const size_t smem = (size_t) (R*D + R*ARKV_KT + 3*R + ARKV_KT)*sizeof(float);
    const dim3 block(D);
    if (D <= 16*ARKV_L) {
        arkv_attn_partial_launch<16>(R, grid, block, smem, a, launch);
    } else {
        arkv_attn_partial_launch<ARKV_D_MAX/ARKV_L>(R, grid, block, smem, a, launch);
    }
}

struct arkv_out_args {
    const float * part;
    float * out;     // F32 [D*n_head, n_tok]
    float * ml;      // [max | sum] per row
    int     D;
    int64_t n_rows;
    int     n_chunk;
};

// the output of row r = blockIdx.x (one thread per element) and the row's final [max | sum]
static __global__ void arkv_attn_out_kernel(const arkv_out_args a) {
    const int64_t r = blockIdx.x;
    const int tid = threadIdx.x;
    const int64_t n_rows = a.n_rows;
    float m = -INFINITY;
    for (int c = 0; c < a.n_chunk; ++c) {
        m = fmaxf(m, arkv_part_chunk(a.part, n_rows, a.D, c)[r]);
    }
    float l = 0.0f;
    for (int c = 0; c < a.n_chunk; ++c) {
        const float * M = arkv_part_chunk(a.part, n_rows, a.D, c);
        if (M[n_rows + r] > 0.0f) {
            l += M[n_rows + r]*expf(M[r] - m);
        }
    }
    float o = 0.0f;
    if (l > 0.0f) {
        for (int c = 0; c < a.n_chunk; ++c) {
            const float * M = arkv_part_chunk(a.part, n_rows, a.D, c);
            if (M[n_rows + r] > 0.0f) {
                o += M[2*n_rows + r*a.D + tid]*(expf(M[r] - m)/l);
            }
        }
    }
    a.out[r*a.D + tid] = o;
    if (tid == 0) {
        a.ml[r] = m;
        a.ml[n_rows + r] = l;
    }
}

struct arkv_scores_args {
    const float * probs; // [n_sel*n_head][n_kv] logits
    const float * ml;    // [max | sum] per row
    char * acc_lo;       // F32 [H, cap, 2]: keys [0, n_lo)
    char * acc_o;        // keys [n_lo, n_kv)
    size_t lo_nb0, lo_nb1, lo_nb2;
    size_t o_nb0, o_nb1, o_nb2;
    int    n_head, H, n_sel, sel0, n_lo, n_kv;
    int64_t n_rows;
};

// key j = one thread: p and p^2 of the scored queries, summed over them and the GQA group, per KV head, into the
// key's accumulators (each (head, key) written by one thread: no atomics)
static __global__ void arkv_attn_scores_kernel(const arkv_scores_args a) {
    const int64_t j = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (j >= a.n_kv) {
        return;
    }
    const int G = a.n_head/a.H;
    const bool is_lo = j < a.n_lo;
    char * base = is_lo ? a.acc_lo + j*a.lo_nb1 : a.acc_o + (j - a.n_lo)*a.o_nb1;
    const size_t nb0 = is_lo ? a.lo_nb0 : a.o_nb0;
    const size_t nb2 = is_lo ? a.lo_nb2 : a.o_nb2;
    for (int hk = 0; hk < a.H; ++hk) {
        float t1 = 0.0f;
        float t2 = 0.0f;
        for (int ts = 0; ts < a.n_sel; ++ts) {
            for (int h = hk*G; h < (hk + 1)*G; ++h) {
                const int64_t r = (int64_t) (a.sel0 + ts)*a.n_head + h;
                const float x = a.probs[((int64_t) ts*a.n_head + h)*a.n_kv + j];
                const float l = a.ml[a.n_rows + r];
                if (x != -INFINITY && l > 0.0f) {
                    const float pr = expf(x - a.ml[r])/l;
                    t1 += pr;
                    t2 += pr*pr;
                }
            }
        }
        if (t1 != 0.0f) { // hidden to every scored query (padding slots included): nothing is written there
            *(float *) (base + hk*nb0) += t1;
            *(float *) (base + hk*nb0 + nb2) += t2;
        }
    }
}

// src: part[, acc_o[, acc_lo]]
static bool arkv_attn_combine_supported(const ggml_tensor * op) {
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(op);
    return op->type == GGML_TYPE_F32 && op->src[0] && op->src[0]->type == GGML_TYPE_F32 && p->n_s == 0 &&
           p->n_head > 0 && op->ne[0] % p->n_head == 0 && op->ne[0]/p->n_head <= ARKV_D_MAX &&
           (p->n_sel == 0 || (op->src[1] && (p->n_lo == 0 || op->src[2])));
}

template <typename L>
static void arkv_attn_combine_run(ggml_tensor * dst, L && launch) {
    const llama_arkv_attn_params * p = llama_arkv_attn_params_of(dst);
    const int n_head = p->n_head;
    const int D = (int) (dst->ne[0]/n_head);
    const int n_tok = (int) dst->ne[1];
    const int64_t n_rows = (int64_t) n_tok*n_head;
    const int n_kv = p->n_lo + p->n_o;
    float * part = (float *) dst->src[0]->data;
    float * probs = part + (int64_t) p->n_chunk*n_rows*(D + 2);
    float * ml = probs + (int64_t) p->n_sel*n_head*n_kv;
    GGML_ASSERT(ggml_nelements(dst->src[0]) >= (ml - part) + 2*n_rows); // sized by llama_arkv_attn_cpu
    const arkv_out_args o = { part, (float *) dst->data, ml, D, n_rows, p->n_chunk };
    launch(arkv_attn_out_kernel, dim3((unsigned) n_rows), dim3(D), 0, o);

    if (p->n_sel > 0) {
        const ggml_tensor * acc_o = dst->src[1];
        const ggml_tensor * acc_lo = p->n_lo > 0 ? dst->src[2] : acc_o;
        arkv_scores_args a = {};
        a.probs = probs;
        a.ml = ml;
        a.acc_lo = (char *) acc_lo->data;
        a.acc_o = (char *) acc_o->data;
        a.lo_nb0 = acc_lo->nb[0];
        a.lo_nb1 = acc_lo->nb[1];
        a.lo_nb2 = acc_lo->nb[2];
        a.o_nb0 = acc_o->nb[0];
        a.o_nb1 = acc_o->nb[1];
        a.o_nb2 = acc_o->nb[2];
        a.n_head = n_head;
        a.H = (int) acc_o->ne[0];
        a.n_sel = p->n_sel;
        a.sel0 = n_tok - p->n_sel;
        a.n_lo = p->n_lo;
        a.n_kv = n_kv;
        a.n_rows = n_rows;
        constexpr int block = 256;
        launch(arkv_attn_scores_kernel, dim3((n_kv + block - 1)/block), dim3(block), 0, a);
    }
}
