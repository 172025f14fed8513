// ggml-cuda's hook for custom ops with a device implementation (patches/0002-arkv-cuda-custom-ops.patch);
// the implementations: ggml-cuda-arkv.cu
#pragma once

#include "ggml.h"

struct ggml_backend_cuda_context;

// binds the device implementation called name to the custom ops whose CPU function is fun; false: no such name.
// Reached from outside ggml-cuda as the registry's proc address "ggml_backend_custom_op_bind"
bool ggml_cuda_custom_op_bind(const char * name, ggml_custom_op_t fun);

// whether op (GGML_OP_CUSTOM) has a bound implementation that takes its shapes and types
bool ggml_cuda_custom_op_supported(const ggml_tensor * op);

// runs dst's bound implementation on ctx's stream; false when it has none
bool ggml_cuda_custom_op_compute(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
