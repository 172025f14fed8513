// The fused attention's CUDA kernels and their host side (arkv_local/csrc/ggml-cuda-arkv-attn.cuh) compiled for
// the CPU: one OS thread per CUDA thread, __syncthreads and the warp shuffles as barriers, blocks one after
// another. tests/test_cuda_kernels.py builds it, hands it a layer's rows and compares what it writes with numpy.
//
// usage: cuda_emu IN OUT
//   IN:  int32 [D, n_head, H, n_tok, n_lo, n_o, n_chunk, n_sel, start, n_mask, mask_f16, type_lo, cap_lo, cap_o],
//        float scale, then q F32 [n_tok][n_head][D]; k_lo, v_lo [cap_lo][H*row_lo] bytes; k_o, v_o F16
//        [cap_o][H*D]; mask [n_tok][n_mask] (F16 or F32); acc_lo F32 [2][cap_lo][H]; acc_o F32 [2][cap_o][H]
//   OUT: the output F32 [n_tok][n_head*D], then acc_lo and acc_o as the ops left them
//   exit status 2 (nothing written) when the ops' supports functions refuse the shapes

#define ARKV_CUDA_EMU

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

// -- the CUDA primitives the kernels use ---------------------------------------------------------------------

#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using half = uint16_t; // storage, as ggml_fp16_t
struct float2 {
    float x, y;
};

static constexpr int WARP_SIZE = 32;

thread_local dim3 threadIdx, blockIdx, blockDim;

namespace emu {

struct block_state {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<float> xchg; // one value per thread, for the shuffles
    std::vector<float> smem;
};

thread_local block_state * blk = nullptr;

float shfl_xor(float x, int offset) {
    const int t = threadIdx.x;
    const int w = t / WARP_SIZE;
    blk->xchg[t] = x;
    blk->warp_bars[w]->arrive_and_wait();
    const float y = blk->xchg[w*WARP_SIZE + ((t % WARP_SIZE) ^ offset)];
    blk->warp_bars[w]->arrive_and_wait();
    return y;
}

// f(), as a kernel's body, in every thread of every block of grid
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F && f) {
    const unsigned n = block.x*block.y*block.z;
    if (n % WARP_SIZE != 0) {
        fprintf(stderr, "cuda_emu: blocks of %u threads (whole warps only)\n", n);
        exit(1);
    }
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                block_state b;
                b.bar = std::make_unique<std::barrier<>>(n);
                for (unsigned w = 0; w < n/WARP_SIZE; ++w) {
                    b.warp_bars.push_back(std::make_unique<std::barrier<>>(WARP_SIZE));
                }
                b.xchg.assign(n, 0.0f);
                b.smem.assign(smem/sizeof(float) + 1, NAN); // uninitialized shared memory reads as NaN
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < n; ++t) {
                    threads.emplace_back([&, t] {
                        threadIdx = dim3(t);
                        blockIdx  = dim3(x, y, z);
                        blockDim  = block;
                        blk = &b;
                        f();
                    });
                }
                for (auto & th : threads) {
                    th.join();
                }
            }
        }
    }
}

} // namespace emu

inline void __syncthreads() {
    emu::blk->bar->arrive_and_wait();
}

inline float __shfl_xor_sync(unsigned mask, float x, int offset) {
    (void) mask; // every lane takes part, as in the kernels
    return emu::shfl_xor(x, offset);
}

inline float warp_reduce_sum(float x) {
    for (int offset = WARP_SIZE/2; offset > 0; offset >>= 1) {
        x += emu::shfl_xor(x, offset);
    }
    return x;
}

inline float warp_reduce_max(float x) {
    for (int offset = WARP_SIZE/2; offset > 0; offset >>= 1) {
        x = fmaxf(x, emu::shfl_xor(x, offset));
    }
    return x;
}

inline float __half2float(uint16_t h) {
    const uint32_t sign = (h >> 15) & 1;
    const uint32_t exp  = (h >> 10) & 0x1F;
    const uint32_t man  = h & 0x3FF;
    float v;
    if (exp == 0) {
        v = std::ldexp((float) man, -24);
    } else if (exp == 31) {
        v = man ? NAN : INFINITY;
    } else {
        v = std::ldexp((float) (man | 0x400), (int) exp - 25);
    }
    return sign ? -v : v;
}

inline float2 __half22float2(uint32_t h2) {
    return { __half2float(h2 & 0xFFFF), __half2float(h2 >> 16) };
}

inline float * arkv_smem() {
    return emu::blk->smem.data();
}

#define GGML_COMMON_DECL_C // anonymous unions, as CUDA's declarations (b->dm)
#include "ggml-common.h"

#include "ggml-cuda-arkv-attn.cuh"

// -- the harness ----------------------------------------------------------------------------------------------

struct emu_launch {
    template <typename K, typename A>
    void operator()(K kernel, dim3 grid, dim3 block, size_t smem, const A & args) const {
        emu::launch(grid, block, smem, [&] { kernel(args); });
    }
};

static ggml_tensor make_tensor(ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2, void * data) {
    ggml_tensor t;
    memset(&t, 0, sizeof(t));
    t.type  = type;
    t.ne[0] = ne0;
    t.ne[1] = ne1;
    t.ne[2] = ne2;
    t.ne[3] = 1;
    t.nb[0] = ggml_type_size(type);
    t.nb[1] = ggml_row_size(type, ne0);
    t.nb[2] = t.nb[1]*ne1;
    t.nb[3] = t.nb[2]*ne2;
    t.data  = data;
    return t;
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: cuda_emu IN OUT\n");
        return 1;
    }
    std::ifstream in(argv[1], std::ios::binary);
    int32_t h[14];
    float scale;
    in.read((char *) h, sizeof(h));
    in.read((char *) &scale, sizeof(scale));
    const int D = h[0], n_head = h[1], H = h[2], n_tok = h[3], n_lo = h[4], n_o = h[5], n_chunk = h[6], n_sel = h[7];
    const int start = h[8], n_mask = h[9], mask_f16 = h[10], cap_lo = h[12], cap_o = h[13];
    const ggml_type type_lo = (ggml_type) h[11];
    auto read = [&](size_t n) {
        std::vector<char> v(n);
        in.read(v.data(), (std::streamsize) n);
        return v;
    };
    const size_t row_lo = ggml_row_size(type_lo, (int64_t) H*D);
    std::vector<char> q = read(sizeof(float)*n_tok*n_head*D);
    std::vector<char> k_lo = read(row_lo*cap_lo), v_lo = read(row_lo*cap_lo);
    std::vector<char> k_o = read(2*(size_t) cap_o*H*D), v_o = read(2*(size_t) cap_o*H*D);
    std::vector<char> mask = read((mask_f16 ? 2 : 4)*(size_t) n_tok*n_mask);
    std::vector<char> acc_lo = read(sizeof(float)*2*cap_lo*H), acc_o = read(sizeof(float)*2*cap_o*H);
    if (!in) {
        fprintf(stderr, "cuda_emu: %s is short\n", argv[1]);
        return 1;
    }

    ggml_tensor tq  = make_tensor(GGML_TYPE_F32, D, n_head, n_tok, q.data());
    ggml_tensor tkl = make_tensor(type_lo, (int64_t) H*D, cap_lo, 1, k_lo.data());
    ggml_tensor tvl = make_tensor(type_lo, (int64_t) H*D, cap_lo, 1, v_lo.data());
    ggml_tensor tko = make_tensor(GGML_TYPE_F16, (int64_t) H*D, cap_o, 1, k_o.data());
    ggml_tensor tvo = make_tensor(GGML_TYPE_F16, (int64_t) H*D, cap_o, 1, v_o.data());
    ggml_tensor tm  = make_tensor(mask_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32, n_mask, n_tok, 1, mask.data());
    ggml_tensor tal = make_tensor(GGML_TYPE_F32, H, cap_lo, 2, acc_lo.data());
    ggml_tensor tao = make_tensor(GGML_TYPE_F32, H, cap_o, 2, acc_o.data());

    llama_arkv_attn_params p;
    p.scale = scale;
    p.n_head = n_head;
    p.n_lo = n_lo;
    p.n_o = n_o;
    p.start = start;
    p.n_sel = n_sel;
    p.n_chunk = n_chunk;

    // as llama_arkv_attn_cpu builds them: the partial's size, sources and params
    const int64_t n_rows = (int64_t) n_tok*n_head;
    const int64_t n_part = n_chunk*n_rows*(D + 2) + (int64_t) n_sel*n_head*(n_lo + n_o) + 2*n_rows;
    std::vector<float> part(n_part, NAN);
    std::vector<float> out((size_t) n_rows*D, NAN);
    ggml_tensor tp = make_tensor(GGML_TYPE_F32, n_part, 1, 1, part.data());
    ggml_tensor to = make_tensor(GGML_TYPE_F32, (int64_t) D*n_head, n_tok, 1, out.data());
    tp.op = to.op = GGML_OP_CUSTOM;
    tp.src[0] = &tq;
    tp.src[1] = &tko;
    tp.src[2] = &tvo;
    tp.src[3] = &tm;
    if (n_lo > 0) {
        tp.src[4] = &tkl;
        tp.src[5] = &tvl;
    }
    to.src[0] = &tp;
    if (n_sel > 0) {
        to.src[1] = &tao;
        if (n_lo > 0) {
            to.src[2] = &tal;
        }
    }
    memcpy((char *) tp.op_params + LLAMA_ARKV_ATTN_PARAMS_OFFS, &p, sizeof(p));
    memcpy((char *) to.op_params + LLAMA_ARKV_ATTN_PARAMS_OFFS, &p, sizeof(p));

    if (!arkv_attn_partial_supported(&tp) || !arkv_attn_combine_supported(&to)) {
        return 2;
    }
    arkv_attn_partial_run(&tp, emu_launch{});
    arkv_attn_combine_run(&to, emu_launch{});

    std::ofstream os(argv[2], std::ios::binary);
    os.write((const char *) out.data(), (std::streamsize) (out.size()*sizeof(float)));
    os.write(acc_lo.data(), (std::streamsize) acc_lo.size());
    os.write(acc_o.data(), (std::streamsize) acc_o.size());
    return os ? 0 : 1;
}
