// Custom ops with a device implementation on CUDA: the fused decode attention's two ops
// (ggml-cuda-arkv-attn.cuh), run on ggml-cuda's stream.
//
// ggml-cuda runs no GGML_OP_CUSTOM node of its own; the hook (patches/0002-arkv-cuda-custom-ops.patch) asks
// this file instead (ggml-cuda-arkv.cuh). An op is ours when its CPU function was bound to one of the
// implementations here by name (libllama: llama_arkv_attn_bind_device). Compiled into ggml-cuda by our
// CMakeLists.txt.

#include "ggml-cuda-arkv.cuh"

#include "ggml-cuda/common.cuh"
#include "ggml-impl.h"

#include "ggml-cuda-arkv-attn.cuh"

#include <atomic>
#include <cstring>

static_assert(sizeof(ggml_custom_op_params) <= LLAMA_ARKV_ATTN_PARAMS_OFFS, "the params follow ggml's custom op params");

//
// the fused attention on ggml-cuda's stream
//

// kernel<<<grid, block, smem, stream>>>(args), for the ops' host side (ggml-cuda-arkv-attn.cuh)
struct ggml_cuda_launch {
    cudaStream_t stream;

    template <typename K, typename A>
    void operator()(K kernel, dim3 grid, dim3 block, size_t smem, const A & args) const {
        kernel<<<grid, block, smem, stream>>>(args);
    }
};

static void arkv_attn_partial_cuda(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    arkv_attn_partial_run(dst, ggml_cuda_launch{ ctx.stream() });
}

static void arkv_attn_combine_cuda(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    arkv_attn_combine_run(dst, ggml_cuda_launch{ ctx.stream() });
}

//
// registry
//

struct ggml_cuda_custom_impl {
    const char * name;
    bool (*supported)(const ggml_tensor * op);
    void (*compute)(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
    std::atomic<ggml_custom_op_t> fun{nullptr}; // the CPU function of the ops this implements (ggml_cuda_custom_op_bind)
};

static ggml_cuda_custom_impl ggml_cuda_custom_impls[] = {
    { "arkv_attn_partial", arkv_attn_partial_supported, arkv_attn_partial_cuda },
    { "arkv_attn_combine", arkv_attn_combine_supported, arkv_attn_combine_cuda },
};

static const ggml_cuda_custom_impl * ggml_cuda_custom_find(const ggml_tensor * op) {
    const ggml_custom_op_t fun = ((const ggml_custom_op_params *) op->op_params)->fun;
    for (const auto & impl : ggml_cuda_custom_impls) {
        if (fun && impl.fun.load() == fun) {
            return &impl;
        }
    }
    return nullptr;
}

bool ggml_cuda_custom_op_bind(const char * name, ggml_custom_op_t fun) {
    for (auto & impl : ggml_cuda_custom_impls) {
        if (strcmp(impl.name, name) == 0) {
            impl.fun.store(fun);
            return true;
        }
    }
    return false;
}

bool ggml_cuda_custom_op_supported(const ggml_tensor * op) {
    const ggml_cuda_custom_impl * impl = ggml_cuda_custom_find(op);
    return impl && impl->supported(op);
}

bool ggml_cuda_custom_op_compute(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_cuda_custom_impl * impl = ggml_cuda_custom_find(dst);
    if (!impl) {
        return false;
    }
    impl->compute(ctx, dst);
    return true;
}
