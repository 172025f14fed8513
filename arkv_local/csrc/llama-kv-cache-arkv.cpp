// Tri-state KV memory (ARKV): the llama_memory_i side. Pools, metadata, seq_*, state save/load.
// Plans live in llama-arkv-plan.cpp, graph building (attention paths, scores, statistics) in
// llama-arkv-graph.cpp.

#include "llama-kv-cache-arkv.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>

#ifndef _WIN32
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

//
// construction
//

std::string llama_kv_cache_arkv::unsupported_reason(const llama_model & model, const llama_cparams & cparams) {
    const auto & hp = model.hparams;
    static const llm_arch supported[] = {
        LLM_ARCH_LLAMA, LLM_ARCH_QWEN2, LLM_ARCH_QWEN3, LLM_ARCH_QWEN3MOE, LLM_ARCH_GRANITE, LLM_ARCH_MISTRAL3,
    };
    const std::string arch = llm_arch_name(model.arch);
    if (llm_arch_is_recurrent(model.arch)) {
        return "the model (" + arch + ") is recurrent: it has no KV cache to compress";
    }
    if (llm_arch_is_hybrid(model.arch)) {
        return "the model (" + arch + ") is hybrid (recurrent and attention layers)";
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE || hp.is_swa_any()) {
        return "the model (" + arch + ") uses sliding-window attention";
    }
    if (hp.n_pos_per_embd() > 1) {
        return "the model (" + arch + ") uses M-RoPE (several positions per token)";
    }
    if (hp.use_alibi) {
        return "the model (" + arch + ") uses ALiBi position biases";
    }
    if (hp.is_mla()) {
        return "the model (" + arch + ") uses multi-head latent attention (MLA)";
    }
    if (std::find(std::begin(supported), std::end(supported), model.arch) == std::end(supported)) {
        return "the architecture " + arch + " is not supported yet (supported: llama, qwen2, qwen3, qwen3moe, granite, mistral3)";
    }
    if (!hp.causal_attn) {
        return "the model (" + arch + ") uses non-causal attention";
    }
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (hp.n_head_kv(il) != hp.n_head_kv(0) || hp.n_embd_head_k(il) != hp.n_embd_head_k(0) ||
            hp.n_embd_head_v(il) != hp.n_embd_head_k(0) || !hp.has_kv(il)) {
            return "the model (" + arch + ") has layers of different KV shapes";
        }
    }
    if (cparams.n_seq_max > 1) {
        return "ARKV serves one sequence (n_seq_max = " + std::to_string(cparams.n_seq_max) + ")";
    }
    return "";
}

llama_kv_cache_arkv::llama_kv_cache_arkv(const llama_model & model, const llama_cparams & cparams, const llama_arkv_params & params)
    : model(model), hparams(model.hparams), params(params) {
    GGML_ASSERT(unsupported_reason(model, cparams).empty());

    n_head_kv_ = hparams.n_head_kv(0);
    head_dim_  = hparams.n_embd_head_k(0);

    const ggml_type tq = params.type_q;
    if (tq != GGML_TYPE_Q4_0 && tq != GGML_TYPE_Q4_1 && tq != GGML_TYPE_Q8_0) {
        throw std::runtime_error(std::string("ARKV Q pool type must be q4_0, q4_1 or q8_0, not ") + ggml_type_name(tq));
    }
    if (head_dim_ % ggml_blck_size(tq) != 0) {
        throw std::runtime_error("head size " + std::to_string(head_dim_) + " is not a multiple of the " +
                                 ggml_type_name(tq) + " block (" + std::to_string(ggml_blck_size(tq)) + ")");
    }
    if (hparams.no_alloc) {
        throw std::runtime_error("ARKV does not support no_alloc (memory fitting) contexts");
    }

    // as llama.cpp does for its quantized caches: a Walsh-Hadamard rotation spreads outliers
    rot_k = params.rotate && head_dim_ % 64 == 0;
    rot_v = params.rotate && head_dim_ % 64 == 0;

    arena_bytes = params.budget_bytes / 2;
    const uint32_t cap_o_max = arena_bytes / row_bytes_o();
    if (cap_o_max < 1) {
        throw std::runtime_error("ARKV budget of " + std::to_string(params.budget_bytes) +
                                 " bytes per layer holds no token (one f16 token costs " +
                                 std::to_string(2*row_bytes_o()) + ")");
    }
    const uint32_t cap_o = params.n_o_init == 0 ? cap_o_max : params.n_o_init;
    if (cap_o > cap_o_max) {
        throw std::runtime_error("ARKV n_o_init = " + std::to_string(cap_o) + " exceeds what the budget holds in f16 (" +
                                 std::to_string(cap_o_max) + ")");
    }
    alloc_layers(cparams, cap_o_max);
    alloc_spill(cparams);

    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ctx_pools.reset(ggml_init(ip));
    for (auto & l : layers) {
        place_pools(ctx_pools.get(), l, cap_o);
    }

    LLAMA_LOG_INFO("%s: ARKV: %u layers, %u KV heads x %u, %zu bytes per layer, O %u slots, Q (%s) %u slots, rotation %s\n",
                   __func__, n_layer(), n_head_kv_, head_dim_, 2*arena_bytes, cap_o, ggml_type_name(tq),
                   layers.empty() ? 0 : layers[0].cap_lo, rot_k ? "on" : "off");
}

// per layer, the K and V arenas and the score and statistics tensors, one buffer per buffer type, zeroed
void llama_kv_cache_arkv::alloc_layers(const llama_cparams & cparams, uint32_t cap_o_max) {
    const uint32_t cap_lo_max = arena_bytes / row_bytes_lo();
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;
    auto ctx_for_buft = [&](ggml_backend_buffer_type_t buft) -> ggml_context * {
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = { size_t(8u*hparams.n_layer()*ggml_tensor_overhead()), nullptr, true }; // 5 per layer
            it = ctx_map.emplace(buft, ggml_context_ptr(ggml_init(ip))).first;
        }
        return it->second.get();
    };

    map_layer_ids.assign(hparams.n_layer_all, -1);
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
        if (cparams.offload_kqv) {
            buft = ggml_backend_dev_buffer_type(model.dev_layer(il));
        }
        ggml_context * ctx = ctx_for_buft(buft);

        layer l;
        l.il      = il;
        l.k_arena = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, arena_alloc_bytes());
        l.v_arena = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, arena_alloc_bytes());
        l.acc_o   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_head_kv_, cap_o_max, 2);
        l.acc_lo  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_head_kv_, std::max<uint32_t>(cap_lo_max, 1), 2);
        l.stats   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 3);
        if (!ggml_backend_buft_is_host(buft) && llama_arkv_attn_bind_device(ggml_backend_buft_get_device(buft))) {
            l.dev_fused = ggml_backend_buft_get_device(buft); // decoding over these pools: its kernels (choose_attn_path)
        }
        ggml_format_name(l.k_arena, "arkv_k_l%d", il);
        ggml_format_name(l.v_arena, "arkv_v_l%d", il);
        ggml_format_name(l.acc_o, "arkv_acc_o_l%d", il);
        ggml_format_name(l.acc_lo, "arkv_acc_lo_l%d", il);
        ggml_format_name(l.stats, "arkv_stats_l%d", il);

        map_layer_ids[il] = layers.size();
        layers.push_back(std::move(l));
    }

    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            throw std::runtime_error("failed to allocate the ARKV KV buffers");
        }
        ggml_backend_buffer_clear(buf, 0); // masked padding rows must never hold NaN
        LLAMA_LOG_INFO("%s: %10s ARKV KV buffer size = %8.2f MiB\n", __func__, ggml_backend_buffer_name(buf),
                       ggml_backend_buffer_get_size(buf)/1024.0/1024.0);
        ctxs_bufs.emplace_back(std::move(ctx), buf);
    }

}

// the spilled pools of all layers in one host buffer, outside the budget: pinned host memory of the layers'
// device where its backend offers it, else RAM, or (spill_dir) a file mapped into memory and unlinked at once,
// so that it is never shared and goes away with the context or the process
void llama_kv_cache_arkv::alloc_spill(const llama_cparams & cparams) {
    if (params.cap_s == 0) {
        return;
    }
    const int64_t n_embd_gqa = (int64_t) head_dim_*n_head_kv_;
    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ctx_spill.reset(ggml_init(ip));
    for (auto & l : layers) {
        l.cap_s = params.cap_s;
        l.pos_s.assign((size_t) l.cap_s*n_head_kv_, -1);
        l.k_s   = ggml_new_tensor_2d(ctx_spill.get(), params.type_q, n_embd_gqa, l.cap_s);
        l.v_s   = ggml_new_tensor_2d(ctx_spill.get(), params.type_q, n_embd_gqa, l.cap_s);
        l.acc_s = ggml_new_tensor_3d(ctx_spill.get(), GGML_TYPE_F32, n_head_kv_, l.cap_s, 2);
        ggml_format_name(l.k_s, "arkv_k_s_l%d", l.il);
        ggml_format_name(l.v_s, "arkv_v_s_l%d", l.il);
        ggml_format_name(l.acc_s, "arkv_acc_s_l%d", l.il);
    }

    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    if (params.spill_dir) {
#ifdef _WIN32
        throw std::runtime_error("a spill to disk needs a POSIX system (mmap)");
#else
        const size_t align = ggml_backend_buft_get_alignment(buft);
        size_t total = align;
        for (ggml_tensor * t = ggml_get_first_tensor(ctx_spill.get()); t; t = ggml_get_next_tensor(ctx_spill.get(), t)) {
            total += GGML_PAD(ggml_nbytes(t), align);
        }
        std::string path = std::string(params.spill_dir) + "/arkv-spill-XXXXXX";
        const int fd = mkstemp(path.data());
        if (fd < 0) {
            throw std::runtime_error("cannot create a spill file in " + std::string(params.spill_dir) + ": " + strerror(errno));
        }
        unlink(path.c_str()); // the mapping keeps it alive; nothing is left behind, nobody else opens it
        const int err = posix_fallocate(fd, 0, (off_t) total); // a full disk fails here, not with SIGBUS later
        void * map = err == 0 ? mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
        close(fd);
        if (map == MAP_FAILED) {
            throw std::runtime_error("cannot reserve " + std::to_string(total) + " bytes for the spill file in " +
                                     std::string(params.spill_dir) + ": " + strerror(err ? err : errno));
        }
        spill_map = map;
        spill_map_bytes = total;
        for (uint32_t i = 0; i < layers.size(); ++i) {
            spill_releases.push_back({ this, i });
        }
        buf_spill.reset(ggml_backend_cpu_buffer_from_ptr(map, total));
        ggml_tallocr talloc = ggml_tallocr_new(buf_spill.get());
        for (ggml_tensor * t = ggml_get_first_tensor(ctx_spill.get()); t; t = ggml_get_next_tensor(ctx_spill.get(), t)) {
            GGML_ASSERT(ggml_tallocr_alloc(&talloc, t) == GGML_STATUS_SUCCESS);
        }
#endif
    } else {
        if (cparams.offload_kqv && model.dev_layer(0)) {
            if (auto * host = ggml_backend_dev_host_buffer_type(model.dev_layer(0))) {
                buft = host;
            }
        }
        buf_spill.reset(ggml_backend_alloc_ctx_tensors_from_buft(ctx_spill.get(), buft));
        if (!buf_spill) {
            throw std::runtime_error("failed to allocate the ARKV spill buffer");
        }
        // resident from the start, as llama.cpp's cache: the store is reserved memory, and a long chat
        // would otherwise grow RSS page by page as new slots are first written
        ggml_backend_buffer_clear(buf_spill.get(), 0);
    }
    // as weights: the scheduler runs an op that reads S itself (not a view of it: a view has no buffer yet when
    // the graph is split) where S lies. Plan graphs place their gathers from S by hand (plan_inputs::place); a
    // recall pass's read of the rows in use copies those rows (4-bit) to the device
    ggml_backend_buffer_set_usage(buf_spill.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (auto & l : layers) {
        ggml_backend_tensor_memset(l.acc_s, 0, 0, ggml_nbytes(l.acc_s));
    }
    LLAMA_LOG_INFO("%s: %10s ARKV spill buffer size = %8.2f MiB (%u slots per layer%s)\n", __func__,
                   ggml_backend_buffer_name(buf_spill.get()), ggml_backend_buffer_get_size(buf_spill.get())/1024.0/1024.0,
                   params.cap_s, params.spill_dir ? ", a memory-mapped file" : "");
}

// The file's pages stay in the page cache (the kernel writes them back and may drop them); only the mapping
// lets go of them, so that the rows a plan wrote or a recall read do not stay resident in this process.
// MADV_DONTNEED keeps a shared mapping's data: the next access maps the page again.
void llama_kv_cache_arkv::release_spill_pages(const void * p, size_t n) const {
#ifndef _WIN32
    if (!spill_map) {
        return;
    }
    if (!p) {
        p = spill_map;
        n = spill_map_bytes;
    }
    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
    const uintptr_t a = (uintptr_t) p & ~(page - 1);
    const uintptr_t b = ((uintptr_t) p + n + page - 1) & ~(page - 1);
    GGML_ASSERT(a >= (uintptr_t) spill_map && (uintptr_t) p + n <= (uintptr_t) spill_map + spill_map_bytes);
    madvise((void *) a, b - a, MADV_DONTNEED); // advice: a failure leaves the pages resident, nothing else
#else
    GGML_UNUSED(p);
    GGML_UNUSED(n);
#endif
}

void llama_kv_cache_arkv::set_recall(bool on) {
    recall = on;
    if (!on) {
        release_spill_pages(); // what the recall pass read, whichever attention path read it
    }
}

llama_kv_cache_arkv::~llama_kv_cache_arkv() {
    buf_spill.reset();
#ifndef _WIN32
    if (spill_map) {
        munmap(spill_map, spill_map_bytes);
    }
#endif
}

size_t llama_kv_cache_arkv::row_bytes_o() const {
    return ggml_row_size(GGML_TYPE_F16, (int64_t) head_dim_*n_head_kv_);
}

size_t llama_kv_cache_arkv::row_bytes_lo() const {
    return ggml_row_size(params.type_q, (int64_t) head_dim_*n_head_kv_);
}

static size_t arkv_lo_offset(size_t o_bytes) {
    return GGML_PAD(o_bytes, 64); // the LO pool starts aligned
}

// the budget plus zeroed slack of one padded quantized row: a kernel that reads LO rows in blocks of 512 values
// (ggml-cuda's MATRIX_ROW_PADDING) stays inside this arena
size_t llama_kv_cache_arkv::arena_alloc_bytes() const {
    return arena_bytes + ggml_row_size(params.type_q, 512);
}

void llama_kv_cache_arkv::pool_extent(uint32_t i, uint64_t out[6]) const {
    const auto & l = layers[i];
    out[0] = l.k_o ? l.k_o->view_offs : 0;
    out[1] = l.k_o ? ggml_nbytes(l.k_o) : 0;
    out[2] = l.k_lo ? l.k_lo->view_offs : arkv_lo_offset((size_t) l.cap_o*row_bytes_o());
    out[3] = l.k_lo ? ggml_nbytes(l.k_lo) : 0;
    out[4] = ggml_nbytes(l.k_arena);
    out[5] = (!l.k_o || l.k_o->view_src == l.k_arena) && (!l.k_lo || l.k_lo->view_src == l.k_arena) &&
             (!l.v_o || l.v_o->view_src == l.v_arena) && (!l.v_lo || l.v_lo->view_src == l.v_arena);
}

uint32_t llama_kv_cache_arkv::cap_lo_for(uint32_t cap_o) const {
    const size_t off = arkv_lo_offset((size_t) cap_o*row_bytes_o());
    return off >= arena_bytes ? 0 : (arena_bytes - off)/row_bytes_lo();
}

// create the pool tensors of a layout and place them into the layer's arenas
void llama_kv_cache_arkv::place_pools(ggml_context * ctx, layer & l, uint32_t cap_o) {
    const int64_t n_embd_gqa = (int64_t) head_dim_*n_head_kv_;
    const uint32_t cap_lo = cap_lo_for(cap_o);
    GGML_ASSERT(cap_o >= 1 && (size_t) cap_o*row_bytes_o() <= arena_bytes);

    // typed views of the arena, not tensors allocated in it: a backend neither pads nor initializes a view
    // (ggml-cuda pads a quantized tensor's rows to 512 and zeroes the padding: past the pool, into the next one)
    auto place = [&](ggml_tensor * arena, ggml_type type, uint32_t cap, size_t offset, const char * name) -> ggml_tensor * {
        if (cap == 0) {
            return nullptr;
        }
        ggml_tensor * t = ggml_new_tensor_2d(ctx, type, n_embd_gqa, cap);
        ggml_format_name(t, "arkv_%s_l%d", name, l.il);
        GGML_ASSERT(offset + ggml_nbytes(t) <= arena_bytes);
        t->view_src  = arena;
        t->view_offs = offset;
        const ggml_status st = ggml_backend_view_init(t);
        GGML_ASSERT(st == GGML_STATUS_SUCCESS);
        return t;
    };
    const size_t off_lo = arkv_lo_offset((size_t) cap_o*row_bytes_o());
    l.k_o = place(l.k_arena, GGML_TYPE_F16, cap_o, 0, "k_o");
    l.v_o = place(l.v_arena, GGML_TYPE_F16, cap_o, 0, "v_o");
    l.k_lo = place(l.k_arena, params.type_q, cap_lo, off_lo, "k_lo");
    l.v_lo = place(l.v_arena, params.type_q, cap_lo, off_lo, "v_lo");

    // keep the host metadata of slots that survive the layout
    l.pos_o.resize((size_t) cap_o*n_head_kv_, -1);
    l.pos_lo.resize((size_t) cap_lo*n_head_kv_, -1);
    l.cap_o = cap_o;
    l.cap_lo = cap_lo;
}

// rows past n_o and n_lo are read as masked padding: they must hold finite values, never the bytes of an
// earlier layout (old rows read as another type can be NaN, and 0 * NaN poisons the attention)
void llama_kv_cache_arkv::clear_tails(const layer & l) {
    auto clear = [](ggml_tensor * pool, size_t row_bytes, uint32_t n, uint32_t cap) {
        if (pool && n < cap) {
            ggml_backend_tensor_memset(pool, 0, (size_t) n*row_bytes, (size_t) (cap - n)*row_bytes);
        }
    };
    clear(l.k_o, row_bytes_o(), l.n_o, l.cap_o);
    clear(l.v_o, row_bytes_o(), l.n_o, l.cap_o);
    clear(l.k_lo, row_bytes_lo(), l.n_lo, l.cap_lo);
    clear(l.v_lo, row_bytes_lo(), l.n_lo, l.cap_lo);
}

//
// llama_memory_i
//

llama_memory_context_ptr llama_kv_cache_arkv::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    balloc.split_reset();

    std::vector<llama_ubatch> ubatches;
    uint32_t n_tokens = 0;
    while (true) {
        auto ubatch = balloc.split_simple(n_ubatch);
        if (ubatch.n_tokens == 0) {
            break;
        }
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            if (ubatch.n_seq_id[i] != 1 || ubatch.seq_id[i][0] != 0) {
                LLAMA_LOG_ERROR("%s: ARKV serves sequence 0 only\n", __func__);
                return std::make_unique<llama_kv_cache_arkv_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
        n_tokens += ubatch.n_tokens;
        ubatches.push_back(std::move(ubatch));
    }

    if (balloc.get_n_used() < balloc.get_n_tokens() || !can_fit(n_tokens)) {
        LLAMA_LOG_WARN("%s: ARKV: %u new tokens do not fit in the O pools: a plan must free slots first\n", __func__, n_tokens);
        return std::make_unique<llama_kv_cache_arkv_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    return std::make_unique<llama_kv_cache_arkv_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_kv_cache_arkv::init_full() {
    return std::make_unique<llama_kv_cache_arkv_context>(this);
}

llama_memory_context_ptr llama_kv_cache_arkv::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(optimize);
    if (!has_update()) {
        return std::make_unique<llama_kv_cache_arkv_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
    }
    return std::make_unique<llama_kv_cache_arkv_context>(this, lctx);
}

bool llama_kv_cache_arkv::can_fit(uint32_t n_tokens) const {
    for (const auto & l : layers) {
        if (l.n_o + n_tokens > l.cap_o) {
            return false;
        }
    }
    return true;
}

int32_t llama_kv_cache_arkv::free_slots() const {
    int32_t res = INT32_MAX;
    if (!pending.empty()) {
        for (const auto & m : pending) {
            res = std::min<int32_t>(res, m.cap_o - m.n[LLAMA_ARKV_POOL_O]);
        }
        return res;
    }
    for (const auto & l : layers) {
        res = std::min<int32_t>(res, l.cap_o - l.n_o);
    }
    return res;
}

void llama_kv_cache_arkv::clear(bool data) {
    for (auto & l : layers) {
        l.n_o = 0;
        l.n_lo = 0;
        l.n_s = 0;
        std::fill(l.pos_o.begin(), l.pos_o.end(), -1);
        std::fill(l.pos_lo.begin(), l.pos_lo.end(), -1);
        std::fill(l.pos_s.begin(), l.pos_s.end(), -1);
        l.shift_o.clear();
        l.shift_lo.clear();
        l.shift_s.clear();
    }
    pos_max = -1;
    pos_planned_max = -1;
    pending.clear();
    pending_rm.clear();
    has_shift = false;
    stats_valid = false;
    reset_scores();
    if (data) {
        for (auto & [ctx, buf] : ctxs_bufs) {
            ggml_backend_buffer_clear(buf.get(), 0);
        }
    }
}

bool llama_kv_cache_arkv::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    GGML_ASSERT(seq_id <= 0);
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    if (p0 > pos_max || p1 <= p0) {
        return true;
    }
    if (p1 <= pos_max) {
        // a hole in the middle, or a prefix (llama.cpp's context shift drops one): out of every pool
        return remove_rows(p0, p1);
    }
    if (p0 <= seq_pos_min(0)) {
        clear(false);
        return true;
    }
    if (!pending.empty() || p0 <= pos_planned_max) {
        // a pending plan names the rows as they are; a tailored prefix is not what a fresh read of it holds,
        // and llama.cpp's callers (llama-cpp-python's prompt cache) expect that one: they read it again
        // (cut_tail takes a tailored tail out; rows moved by seq_rm or seq_add count as tailored)
        llama_arkv_set_error("positions from " + std::to_string(p0) + " not removed: " + (!pending.empty() ?
            "a plan is pending and names the rows as they are; apply it first (llama_arkv_apply_plan)" :
            "plans moved rows there (llama_arkv_cut_tail takes a tailored tail)"));
        return false;
    }
    GGML_ASSERT(pending_rm.empty() && !has_shift); // both make pos_planned_max = pos_max
    // an untailored tail: the newest rows of O in every layer and head, in position order
    const uint32_t n_rm = pos_max - p0 + 1;
    for (auto & l : layers) {
        GGML_ASSERT(l.n_o >= n_rm);
        for (uint32_t s = l.n_o - n_rm; s < l.n_o; ++s) {
            for (uint32_t h = 0; h < n_head_kv_; ++h) {
                GGML_ASSERT(l.pos_o[s*n_head_kv_ + h] >= p0);
                l.pos_o[s*n_head_kv_ + h] = -1;
            }
        }
        l.n_o -= n_rm;
    }
    pos_max = p0 - 1;
    return true;
}

// positions from p0 on leave the cache whatever plans did to them (a history that continues the cache past
// context shifts, where reading the prefix again is no option): a tailored tail goes out of every pool as a
// middle range and the sequence ends before it. False (nothing changed) where remove_rows refuses.
bool llama_kv_cache_arkv::cut_tail(llama_pos p0) {
    p0 = std::max(p0, 0);
    if (p0 > pos_max || p0 > pos_planned_max || p0 <= seq_pos_min(0)) {
        return seq_rm(0, p0, -1);
    }
    if (!remove_rows(p0, pos_max + 1)) {
        return false;
    }
    if (pos_max >= 0) { // remove_rows clears a cache it empties
        pos_max = p0 - 1;
        pos_planned_max = std::min(pos_planned_max, pos_max);
    }
    return true;
}

void llama_kv_cache_arkv::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    GGML_UNUSED(p0); GGML_UNUSED(p1);
    if (seq_id_src != seq_id_dst) {
        LLAMA_LOG_ERROR("%s: ARKV serves one sequence: seq_cp(%d, %d) ignored\n", __func__, seq_id_src, seq_id_dst);
    }
}

void llama_kv_cache_arkv::seq_keep(llama_seq_id seq_id) {
    GGML_UNUSED(seq_id); // one sequence: nothing else to drop
}

// as llama.cpp's: rows at positions in [p0, p1) move by shift, their K rotated by it at the next update; rows
// that would land below 0 are removed (as by seq_rm; if they cannot be, nothing changes and the error says why)
void llama_kv_cache_arkv::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    GGML_ASSERT(seq_id <= 0);
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    if (shift == 0 || p0 >= p1 || pos_max < 0) {
        return;
    }
    if (shift < 0 && p0 < -shift && !remove_rows(p0, std::min(p1, -shift))) {
        LLAMA_LOG_ERROR("%s: positions not shifted: %s\n", __func__, llama_arkv_last_error());
        return;
    }
    shift_rows(p0, p1, shift);
}

// llama.cpp's self-extend divides positions; its grouped positions are not served
void llama_kv_cache_arkv::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    GGML_ASSERT(seq_id <= 0);
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    p0 = std::max(p0, 1); // position 0 stays
    bool any = false;
    for (const auto & l : layers) {
        for (const auto * pos : { &l.pos_o, &l.pos_lo, &l.pos_s }) {
            any = any || std::any_of(pos->begin(), pos->end(), [&](llama_pos p) { return p >= p0 && p < p1; });
        }
    }
    if (d == 1 || !any) {
        return; // no position would change
    }
    llama_arkv_set_error("ARKV cannot divide positions (seq_div, used by self-extend): positions unchanged");
    LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
}

llama_pos llama_kv_cache_arkv::pos_min_slow() const {
    llama_pos res = std::numeric_limits<llama_pos>::max();
    for (const auto & l : layers) {
        for (size_t i = 0; i < (size_t) l.n_o*n_head_kv_; ++i) {
            res = std::min(res, l.pos_o[i]);
        }
        for (size_t i = 0; i < (size_t) l.n_lo*n_head_kv_; ++i) {
            res = std::min(res, l.pos_lo[i]);
        }
        for (size_t i = 0; i < (size_t) l.n_s*n_head_kv_; ++i) {
            res = std::min(res, l.pos_s[i]);
        }
    }
    return res == std::numeric_limits<llama_pos>::max() ? -1 : res;
}

llama_pos llama_kv_cache_arkv::seq_pos_min(llama_seq_id seq_id) const {
    GGML_UNUSED(seq_id);
    return pos_max < 0 ? -1 : pos_min_slow();
}

llama_pos llama_kv_cache_arkv::seq_pos_max(llama_seq_id seq_id) const {
    GGML_UNUSED(seq_id);
    return pos_max;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_arkv::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> ret;
    for (const auto & [ctx, buf] : ctxs_bufs) {
        ret[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
    }
    if (buf_spill) {
        ret[ggml_backend_buffer_get_type(buf_spill.get())] += ggml_backend_buffer_get_size(buf_spill.get());
    }
    return ret;
}

llama_arkv_layer_info llama_kv_cache_arkv::layer_info(uint32_t i) const {
    const auto & l = layers[i];
    llama_arkv_layer_info res;
    res.cap_o = l.cap_o;
    res.cap_q = l.cap_lo;
    res.n_o   = l.n_o;
    res.n_q   = l.n_lo;
    res.bytes_alloc = 2*arena_bytes;
    res.bytes_used  = 2*((size_t) l.n_o*row_bytes_o() + (size_t) l.n_lo*row_bytes_lo());
    res.cap_s       = l.cap_s;
    res.n_s         = l.n_s;
    res.bytes_spill = 2*(size_t) l.n_s*row_bytes_lo();
    return res;
}

//
// scores and statistics
//

void llama_kv_cache_arkv::reset_scores() {
    for (auto & l : layers) {
        ggml_backend_tensor_memset(l.acc_o, 0, 0, ggml_nbytes(l.acc_o));
        ggml_backend_tensor_memset(l.acc_lo, 0, 0, ggml_nbytes(l.acc_lo));
        for (int plane = 0; plane < 2 && l.n_s > 0; ++plane) { // only the rows in use: S may be large
            ggml_backend_tensor_memset(l.acc_s, 0, plane*l.acc_s->nb[2], (size_t) l.n_s*l.acc_s->nb[1]);
        }
    }
    release_spill_pages(); // the spilled rows' scores lie in the spill file too
    n_scored = 0;
}

void llama_kv_cache_arkv::get_scores(float * sum_o, float * sum_sq_o, float * sum_q, float * sum_sq_q,
                                     float * sum_s, float * sum_sq_s) const {
    size_t off[3] = {};
    float * sums[3][2] = { { sum_q, sum_sq_q }, { sum_o, sum_sq_o }, { sum_s, sum_sq_s } };
    for (uint32_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & l = layers[ikv];
        const uint32_t n[3]   = { l.n_lo, l.n_o, l.n_s };
        const uint32_t cap[3] = { l.cap_lo, l.cap_o, l.cap_s };
        // the rows in use at the offsets of a pool of cap rows, free slots zero
        for (int pool = 0; pool < 3; ++pool) {
            for (int plane = 0; plane < 2; ++plane) {
                float * out = sums[pool][plane] + off[pool];
                read_scores(l, ikv, pool, plane, out);
                std::fill(out + (size_t) n[pool]*n_head_kv_, out + (size_t) cap[pool]*n_head_kv_, 0.0f);
            }
            off[pool] += (size_t) cap[pool]*n_head_kv_;
        }
    }
    release_spill_pages(); // the spilled rows' scores lie in the spill file
}

void llama_kv_cache_arkv::request_stats() {
    for (auto & l : layers) {
        ggml_backend_tensor_memset(l.stats, 0, 0, ggml_nbytes(l.stats)); // stays 0 without keys before the window
    }
    want_stats  = true;
    stats_valid = false;
}

bool llama_kv_cache_arkv::get_stats(float * out) const {
    for (size_t i = 0; i < layers.size(); ++i) {
        ggml_backend_tensor_get(layers[i].stats, out + 3*i, 0, 3*sizeof(float));
    }
    return stats_valid;
}
//
// state write/read
//

static constexpr uint32_t ARKV_STATE_MAGIC   = 0x564b5241; // "ARKV"
static constexpr uint32_t ARKV_STATE_VERSION = 4; // 2: with the score accumulators; 3: with the spilled rows;
                                                   // 4: with the rotation (read: 3 too, its rotation unchecked)

// a saved state this cache cannot take: the reason, for llama_arkv_last_error too (llama.cpp logs the exception only)
[[noreturn]] static void arkv_state_refuse(const std::string & why) {
    llama_arkv_set_error(why);
    throw std::runtime_error(why);
}

// one layer: its layout, positions, rows and the scores since the last plan (the next plan decides with them)
void llama_kv_cache_arkv::state_write_layer(llama_io_write_i & io, const layer & l) const {
    const uint32_t counts[] = { l.cap_o, l.n_o, l.n_lo, l.n_s };
    io.write(counts, sizeof(counts));
    io.write(l.pos_o.data(), (size_t) l.n_o*n_head_kv_*sizeof(llama_pos));
    io.write(l.pos_lo.data(), (size_t) l.n_lo*n_head_kv_*sizeof(llama_pos));
    io.write(l.pos_s.data(), (size_t) l.n_s*n_head_kv_*sizeof(llama_pos));
    if (l.n_o > 0) {
        io.write_tensor(l.k_o, 0, (size_t) l.n_o*row_bytes_o());
        io.write_tensor(l.v_o, 0, (size_t) l.n_o*row_bytes_o());
    }
    if (l.n_lo > 0) {
        io.write_tensor(l.k_lo, 0, (size_t) l.n_lo*row_bytes_lo());
        io.write_tensor(l.v_lo, 0, (size_t) l.n_lo*row_bytes_lo());
    }
    if (l.n_s > 0) {
        io.write_tensor(l.k_s, 0, (size_t) l.n_s*row_bytes_lo());
        io.write_tensor(l.v_s, 0, (size_t) l.n_s*row_bytes_lo());
    }
    for (int plane = 0; plane < 2; ++plane) {
        if (l.n_o > 0) {
            io.write_tensor(l.acc_o, plane*l.acc_o->nb[2], (size_t) l.n_o*l.acc_o->nb[1]);
        }
        if (l.n_lo > 0) {
            io.write_tensor(l.acc_lo, plane*l.acc_lo->nb[2], (size_t) l.n_lo*l.acc_lo->nb[1]);
        }
        if (l.n_s > 0) {
            io.write_tensor(l.acc_s, plane*l.acc_s->nb[2], (size_t) l.n_s*l.acc_s->nb[1]);
        }
    }
}

void llama_kv_cache_arkv::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    GGML_UNUSED(flags);
    GGML_ASSERT(seq_id <= 0);
    if (!pending_rm.empty() || has_shift) {
        // the metadata already shows them, the rows do not yet
        llama_arkv_set_error("a seq_rm or seq_add is not applied to the rows yet: call llama_arkv_apply_plan "
                             "(or decode) before saving the state");
        throw std::runtime_error(std::string("ARKV: ") + llama_arkv_last_error());
    }
    const uint32_t hdr[] = { ARKV_STATE_MAGIC, ARKV_STATE_VERSION, n_layer(), n_head_kv_, head_dim_, (uint32_t) params.type_q,
                             (uint32_t) rot_k | (uint32_t) rot_v << 1 };
    io.write(hdr, sizeof(hdr));
    const uint64_t arena = arena_bytes;
    io.write(&arena, sizeof(arena));
    const llama_pos p[] = { pos_max, pos_planned_max };
    io.write(p, sizeof(p));
    io.write(&n_scored, sizeof(n_scored));
    // (llama.cpp copies the tensors when its io object goes, after this returns: the spill file's pages it maps
    // stay resident until the next plan or scores read lets them go)
    for (const auto & l : layers) {
        state_write_layer(io, l);
    }
}

// one layer, as state_write_layer wrote it; its pools are placed in ctx
void llama_kv_cache_arkv::state_read_layer(llama_io_read_i & io, ggml_context * ctx, layer & l) {
    uint32_t counts[4];
    io.read(counts, sizeof(counts));
    const uint32_t cap_o = counts[0];
    if (cap_o < 1 || (size_t) cap_o*row_bytes_o() > arena_bytes || counts[1] > cap_o || counts[2] > cap_lo_for(cap_o)) {
        arkv_state_refuse("the saved ARKV state has an invalid layout");
    }
    if (counts[3] > l.cap_s) {
        arkv_state_refuse("the saved ARKV state holds " + std::to_string(counts[3]) + " spilled rows per layer; "
                          "this cache spills at most " + std::to_string(l.cap_s) + " (kv_spill, kv_spill_bytes)");
    }
    place_pools(ctx, l, cap_o);
    std::fill(l.pos_o.begin(), l.pos_o.end(), -1);
    std::fill(l.pos_lo.begin(), l.pos_lo.end(), -1);
    l.n_o = counts[1];
    l.n_lo = counts[2];
    l.n_s = counts[3];
    io.read(l.pos_o.data(), (size_t) l.n_o*n_head_kv_*sizeof(llama_pos));
    io.read(l.pos_lo.data(), (size_t) l.n_lo*n_head_kv_*sizeof(llama_pos));
    io.read(l.pos_s.data(), (size_t) l.n_s*n_head_kv_*sizeof(llama_pos));
    if (l.n_o > 0) {
        io.read_tensor(l.k_o, 0, (size_t) l.n_o*row_bytes_o());
        io.read_tensor(l.v_o, 0, (size_t) l.n_o*row_bytes_o());
    }
    if (l.n_lo > 0) {
        io.read_tensor(l.k_lo, 0, (size_t) l.n_lo*row_bytes_lo());
        io.read_tensor(l.v_lo, 0, (size_t) l.n_lo*row_bytes_lo());
    }
    if (l.n_s > 0) {
        io.read_tensor(l.k_s, 0, (size_t) l.n_s*row_bytes_lo());
        io.read_tensor(l.v_s, 0, (size_t) l.n_s*row_bytes_lo());
    }
    for (int plane = 0; plane < 2; ++plane) {
        if (l.n_o > 0) {
            io.read_tensor(l.acc_o, plane*l.acc_o->nb[2], (size_t) l.n_o*l.acc_o->nb[1]);
        }
        if (l.n_lo > 0) {
            io.read_tensor(l.acc_lo, plane*l.acc_lo->nb[2], (size_t) l.n_lo*l.acc_lo->nb[1]);
        }
        if (l.n_s > 0) {
            io.read_tensor(l.acc_s, plane*l.acc_s->nb[2], (size_t) l.n_s*l.acc_s->nb[1]);
        }
    }
}

void llama_kv_cache_arkv::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    GGML_UNUSED(flags);
    GGML_ASSERT(seq_id <= 0);
    uint32_t hdr[7] = {};
    io.read(hdr, 6*sizeof(uint32_t));
    if (hdr[0] != ARKV_STATE_MAGIC || (hdr[1] != 3 && hdr[1] != ARKV_STATE_VERSION)) {
        arkv_state_refuse("the saved state is not an ARKV cache state of version 3 or " + std::to_string(ARKV_STATE_VERSION));
    }
    const uint32_t rot = (uint32_t) rot_k | (uint32_t) rot_v << 1;
    if (hdr[1] >= 4) {
        io.read(&hdr[6], sizeof(uint32_t));
    }
    uint64_t arena = 0;
    io.read(&arena, sizeof(arena));
    if (hdr[2] != n_layer() || hdr[3] != n_head_kv_ || hdr[4] != head_dim_) {
        arkv_state_refuse("the saved ARKV state was made with another model (layers, KV heads or head size differ)");
    }
    if (hdr[5] != (uint32_t) params.type_q) {
        const char * saved = hdr[5] < GGML_TYPE_COUNT ? ggml_type_name((ggml_type) hdr[5]) : "unknown";
        arkv_state_refuse(std::string("the saved ARKV state holds ") + saved + " rows, this cache " +
                          ggml_type_name(params.type_q) + " (kv_quant)");
    }
    if (arena != arena_bytes) {
        arkv_state_refuse("the saved ARKV state was made with a budget of " + std::to_string(2*arena) + " bytes per layer, "
                          "this cache has " + std::to_string(2*arena_bytes) + " (kv_budget)");
    }
    if (hdr[1] >= 4 && hdr[6] != rot) {
        arkv_state_refuse(std::string("the saved ARKV state's rows were ") + (hdr[6] ? "" : "not ") + "rotated, this cache's are" +
                          (rot ? "" : " not") + " (kv_rotate)");
    }
    llama_pos p[2];
    io.read(p, sizeof(p));
    uint32_t n_scored_saved = 0;
    io.read(&n_scored_saved, sizeof(n_scored_saved));

    clear(false);
    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ggml_context_ptr ctx_new(ggml_init(ip));
    for (auto & l : layers) {
        state_read_layer(io, ctx_new.get(), l);
    }
    n_scored = n_scored_saved;
    ctx_retired.clear(); // graphs over those were built for an older generation: never reused
    ctx_retired.push_back(std::move(ctx_pools));
    ctx_pools = std::move(ctx_new);
    pools_generation++;
    for (const auto & l : layers) {
        clear_tails(l);
    }
    pos_max = p[0];
    pos_planned_max = p[1];
}

//
// llama_kv_cache_arkv_context
//

llama_kv_cache_arkv_context::llama_kv_cache_arkv_context(llama_memory_status status) : status(status) {}

llama_kv_cache_arkv_context::llama_kv_cache_arkv_context(llama_kv_cache_arkv * kv)
    : status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), is_full(true) {
    lay = kv->make_layout(0, true);
}

llama_kv_cache_arkv_context::llama_kv_cache_arkv_context(llama_kv_cache_arkv * kv, llama_context * lctx)
    : status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), lctx(lctx) {}

llama_kv_cache_arkv_context::llama_kv_cache_arkv_context(llama_kv_cache_arkv * kv, std::vector<llama_ubatch> ubatches)
    : status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), ubatches(std::move(ubatches)) {}

bool llama_kv_cache_arkv_context::next() {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ++i_cur < ubatches.size();
}

bool llama_kv_cache_arkv_context::apply() {
    GGML_ASSERT(!llama_memory_status_is_fail(status));
    if (lctx) {
        return kv->apply_update(lctx);
    }
    if (ubatches.empty()) {
        return true;
    }
    const auto & ubatch = ubatches[i_cur];
    kv->apply_ubatch(ubatch);
    lay = kv->make_layout(ubatch.n_tokens, false);
    if (kv->want_stats && i_cur + 1 == ubatches.size()) {
        lay.stats = true;
        kv->want_stats  = false;
        kv->stats_valid = true;
    }
    return true;
}

const llama_ubatch & llama_kv_cache_arkv_context::get_ubatch() const {
    GGML_ASSERT(i_cur < ubatches.size());
    return ubatches[i_cur];
}

//
// model hook
//

llama_memory_i * llama_arkv_create_memory(const llama_model & model, const llama_cparams & cparams) {
    llama_arkv_params params;
    if (!llama_arkv_take_armed(&params)) {
        return nullptr;
    }
    const std::string reason = llama_kv_cache_arkv::unsupported_reason(model, cparams);
    if (!reason.empty()) {
        llama_arkv_set_error(reason);
        throw std::runtime_error("ARKV: " + reason);
    }
    try {
        return new llama_kv_cache_arkv(model, cparams, params);
    } catch (const std::exception & e) {
        llama_arkv_set_error(e.what());
        throw;
    }
}
