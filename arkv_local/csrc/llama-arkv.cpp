#include "llama-arkv.h"

#include "llama-context.h"
#include "llama-kv-cache-arkv.h"

#include <optional>
#include <string>

#ifndef ARKV_LOCAL_VERSION
#define ARKV_LOCAL_VERSION "dev"
#endif

// per thread: a context is created in the thread that armed it, so two threads creating contexts at
// once never take each other's parameters
static thread_local std::optional<llama_arkv_params> g_arkv_armed;
static thread_local std::string g_arkv_error;

const char * llama_arkv_version(void) {
    static const std::string version =
        std::string("arkv_local ") + ARKV_LOCAL_VERSION + " (llama.cpp " + llama_version() + ")";
    return version.c_str();
}

struct llama_arkv_params llama_arkv_default_params(void) {
    llama_arkv_params p;
    p.budget_bytes    = 0;
    p.n_o_init        = 0;
    p.type_q          = GGML_TYPE_Q4_0;
    p.rotate          = true;
    p.n_score_queries = 32;
    p.attn            = LLAMA_ARKV_ATTN_AUTO;
    p.cap_s           = 0;
    p.spill_dir       = nullptr;
    return p;
}

void llama_arkv_arm(const struct llama_arkv_params * params) {
    static thread_local std::string spill_dir; // the caller's string need not outlive this call
    g_arkv_error.clear();
    if (params) {
        g_arkv_armed = *params;
        if (params->spill_dir) {
            spill_dir = params->spill_dir;
            g_arkv_armed->spill_dir = spill_dir.c_str();
        }
    } else {
        g_arkv_armed.reset();
    }
}

bool llama_arkv_take_armed(llama_arkv_params * out) {
    if (!g_arkv_armed) {
        return false;
    }
    *out = *g_arkv_armed;
    g_arkv_armed.reset();
    return true;
}

void llama_arkv_set_error(const std::string & msg) {
    g_arkv_error = msg;
}

const char * llama_arkv_last_error(void) {
    return g_arkv_error.c_str();
}

void llama_arkv_clear_error(void) {
    g_arkv_error.clear();
}

static llama_kv_cache_arkv * arkv_of(const llama_context * ctx) {
    return ctx ? dynamic_cast<llama_kv_cache_arkv *>(llama_get_memory(ctx)) : nullptr;
}

int32_t llama_arkv_n_layer(const struct llama_context * ctx) {
    const auto * kv = arkv_of(ctx);
    return kv ? (int32_t) kv->n_layer() : -1;
}

int32_t llama_arkv_n_head_kv(const struct llama_context * ctx) {
    const auto * kv = arkv_of(ctx);
    return kv ? (int32_t) kv->n_head_kv() : -1;
}

int32_t llama_arkv_head_dim(const struct llama_context * ctx) {
    const auto * kv = arkv_of(ctx);
    return kv ? (int32_t) kv->head_dim() : -1;
}

uint64_t llama_arkv_slot_bytes(const struct llama_context * ctx, bool quantized) {
    const auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    return 2*(quantized ? kv->row_bytes_lo() : kv->row_bytes_o());
}

uint64_t llama_arkv_compute_bytes(const struct llama_context * ctx) {
    ggml_backend_sched_t sched = ctx->get_sched();
    uint64_t total = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
        total += ggml_backend_sched_get_buffer_size(sched, ggml_backend_sched_get_backend(sched, i));
    }
    return total;
}

uint32_t llama_arkv_cap_q(const struct llama_context * ctx, uint32_t cap_o) {
    const auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    return kv->cap_lo_for(cap_o);
}

int32_t llama_arkv_free_slots(const struct llama_context * ctx) {
    const auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    return kv->free_slots();
}

bool llama_arkv_cut_tail(struct llama_context * ctx, int32_t p0) {
    auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    llama_arkv_set_error("");
    return kv->cut_tail(p0);
}

bool llama_arkv_get_pool_extent(const struct llama_context * ctx, int32_t i, uint64_t * out) {
    const auto * kv = arkv_of(ctx);
    if (!kv || i < 0 || (uint32_t) i >= kv->n_layer()) {
        return false;
    }
    kv->pool_extent(i, out);
    return true;
}

void llama_arkv_get_layers(const struct llama_context * ctx, struct llama_arkv_layer_info * out) {
    const auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    for (uint32_t i = 0; i < kv->n_layer(); ++i) {
        out[i] = kv->layer_info(i);
    }
}

void llama_arkv_get_positions(const struct llama_context * ctx, int32_t * pos_o, int32_t * pos_lo, int32_t * pos_s) {
    const auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    for (uint32_t i = 0; i < kv->n_layer(); ++i) {
        const auto & l = kv->get_layer(i);
        pos_o = std::copy(l.pos_o.begin(), l.pos_o.end(), pos_o);
        pos_lo = std::copy(l.pos_lo.begin(), l.pos_lo.end(), pos_lo);
        pos_s = std::copy(l.pos_s.begin(), l.pos_s.end(), pos_s);
    }
}

uint32_t llama_arkv_get_scores(const struct llama_context * ctx,
                               float * sum_o, float * sum_sq_o, float * sum_q, float * sum_sq_q,
                               float * sum_s, float * sum_sq_s) {
    auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    llama_synchronize(const_cast<llama_context *>(ctx));
    kv->get_scores(sum_o, sum_sq_o, sum_q, sum_sq_q, sum_s, sum_sq_s);
    return kv->get_n_scored();
}

int32_t llama_arkv_apply_plan(struct llama_context * ctx) {
    auto * kv = arkv_of(ctx);
    if (!kv) {
        llama_arkv_set_error("the context's KV memory is not ARKV");
        return -1;
    }
    if (!kv->has_update()) {
        return 1;
    }
    // llama.cpp's own update, as a decode runs it: it applies ours, then drops the graphs built over
    // the old pools and reserves the worst-case graph again (the update graph used the scheduler)
    llama_arkv_set_error("");
    llama_synchronize(ctx); // the last decode's graph may still read the pools
    ctx->memory_update(false);
    return *llama_arkv_last_error() == '\0' ? 0 : -1;
}

void llama_arkv_set_recall(struct llama_context * ctx, bool on) {
    auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    kv->set_recall(on);
}

void llama_arkv_set_prompt(struct llama_context * ctx, bool on) {
    auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    kv->set_prompt(on);
}

int32_t llama_arkv_submit_plan(struct llama_context * ctx, const struct llama_arkv_layer_plan * plans) {
    auto * kv = arkv_of(ctx);
    if (!kv) {
        llama_arkv_set_error("the context's KV memory is not ARKV");
        return -1;
    }
    const std::string err = kv->submit_plan(plans);
    llama_arkv_set_error(err);
    return err.empty() ? 0 : -1;
}

void llama_arkv_request_stats(struct llama_context * ctx) {
    auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    kv->request_stats();
}

bool llama_arkv_get_stats(const struct llama_context * ctx, float * out) {
    auto * kv = arkv_of(ctx);
    GGML_ASSERT(kv);
    llama_synchronize(const_cast<llama_context *>(ctx));
    return kv->get_stats(out);
}
