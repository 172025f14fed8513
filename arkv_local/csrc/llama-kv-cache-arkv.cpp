#include "llama-kv-cache-arkv.h"
#include "llama-arkv-attn-cpu.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>

// ggml ops used, all available on CPU, CUDA and Metal:
//   set_rows (F32 -> F16 / Q4_0 / Q4_1 / Q8_0), get_rows (F16 / quant -> F32, I32 idxs),
//   cast (F32 -> F16), concat (F16, F32), cont, mul_mat, soft_max_ext, sqr, sum_rows, sum, add, sub, mul,
//   div, scale, scale_bias, log, clamp, cpy (F32)
// and, for pools in host memory only, the two custom ops of the fused decode attention (llama-arkv-attn-cpu.h)

static constexpr uint32_t ARKV_N_KV_PAD = 256; // O rows read are padded so graphs can be reused
static constexpr int64_t ARKV_FUSED_MAX_TOKENS = 8; // larger ubatches amortize dequantizing into f16

// the O pool's padded row count for n rows in use
static uint32_t arkv_pad_o(uint32_t n, uint32_t cap) {
    return std::min(cap, std::max(n, GGML_PAD(n, ARKV_N_KV_PAD)));
}

struct llama_kv_cache_arkv::layer_move {
    uint32_t li;    // index in layers
    uint32_t cap_o; // new layout
    uint32_t n_o;
    uint32_t n_q;
    std::vector<int32_t> o_src;    // [n_o][n_head_kv] old O slots
    std::vector<int32_t> q_src;    // [n_q][n_head_kv] old slots
    std::vector<uint8_t> q_from_o; // [n_q][n_head_kv]
};

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
    const uint32_t cap_q_max = arena_bytes / row_bytes_q();

    // arenas and score accumulators, one context per buffer type
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
        l.k_arena = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, arena_bytes);
        l.v_arena = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, arena_bytes);
        l.acc_o   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_head_kv_, cap_o_max, 2);
        l.acc_q   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_head_kv_, std::max<uint32_t>(cap_q_max, 1), 2);
        l.stats   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 3);
        ggml_format_name(l.k_arena, "arkv_k_l%d", il);
        ggml_format_name(l.v_arena, "arkv_v_l%d", il);
        ggml_format_name(l.acc_o, "arkv_acc_o_l%d", il);
        ggml_format_name(l.acc_q, "arkv_acc_q_l%d", il);
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

    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ctx_pools.reset(ggml_init(ip));
    for (auto & l : layers) {
        place_pools(ctx_pools.get(), l, cap_o);
    }

    LLAMA_LOG_INFO("%s: ARKV: %u layers, %u KV heads x %u, %zu bytes per layer, O %u slots, Q (%s) %u slots, rotation %s\n",
                   __func__, n_layer(), n_head_kv_, head_dim_, 2*arena_bytes, cap_o, ggml_type_name(tq),
                   layers.empty() ? 0 : layers[0].cap_q, rot_k ? "on" : "off");
}

llama_kv_cache_arkv::~llama_kv_cache_arkv() = default;

size_t llama_kv_cache_arkv::row_bytes_o() const {
    return ggml_row_size(GGML_TYPE_F16, (int64_t) head_dim_*n_head_kv_);
}

size_t llama_kv_cache_arkv::row_bytes_q() const {
    return ggml_row_size(params.type_q, (int64_t) head_dim_*n_head_kv_);
}

static size_t arkv_q_offset(size_t o_bytes) {
    return GGML_PAD(o_bytes, 64); // the Q pool starts aligned
}

uint32_t llama_kv_cache_arkv::cap_q_for(uint32_t cap_o) const {
    const size_t off = arkv_q_offset((size_t) cap_o*row_bytes_o());
    return off >= arena_bytes ? 0 : (arena_bytes - off)/row_bytes_q();
}

// create the pool tensors of a layout and place them into the layer's arenas
void llama_kv_cache_arkv::place_pools(ggml_context * ctx, layer & l, uint32_t cap_o) {
    const int64_t n_embd_gqa = (int64_t) head_dim_*n_head_kv_;
    const uint32_t cap_q = cap_q_for(cap_o);
    GGML_ASSERT(cap_o >= 1 && (size_t) cap_o*row_bytes_o() <= arena_bytes);

    auto place = [&](ggml_tensor * arena, ggml_type type, uint32_t cap, size_t offset, const char * name) -> ggml_tensor * {
        if (cap == 0) {
            return nullptr;
        }
        ggml_tensor * t = ggml_new_tensor_2d(ctx, type, n_embd_gqa, cap);
        ggml_format_name(t, "arkv_%s_l%d", name, l.il);
        const ggml_status st = ggml_backend_tensor_alloc(arena->buffer, t, (char *) arena->data + offset);
        GGML_ASSERT(st == GGML_STATUS_SUCCESS);
        return t;
    };
    const size_t off_q = arkv_q_offset((size_t) cap_o*row_bytes_o());
    l.k_o = place(l.k_arena, GGML_TYPE_F16, cap_o, 0, "k_o");
    l.v_o = place(l.v_arena, GGML_TYPE_F16, cap_o, 0, "v_o");
    l.k_q = place(l.k_arena, params.type_q, cap_q, off_q, "k_q");
    l.v_q = place(l.v_arena, params.type_q, cap_q, off_q, "v_q");

    // keep the host metadata of slots that survive the layout
    l.pos_o.resize((size_t) cap_o*n_head_kv_, -1);
    l.pos_q.resize((size_t) cap_q*n_head_kv_, -1);
    l.cap_o = cap_o;
    l.cap_q = cap_q;
}

// rows past n_o are read as masked padding as the pool fills: they must hold finite f16 values,
// never the bytes of an earlier layout (old Q rows read as f16 can be NaN, and 0 * NaN poisons
// the attention)
void llama_kv_cache_arkv::clear_o_tail(const layer & l) {
    const size_t off = (size_t) l.n_o*row_bytes_o();
    const size_t end = (size_t) l.cap_o*row_bytes_o();
    ggml_backend_tensor_memset(l.k_o, 0, off, end - off);
    ggml_backend_tensor_memset(l.v_o, 0, off, end - off);
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
    if (pending.empty()) {
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

void llama_kv_cache_arkv::clear(bool data) {
    for (auto & l : layers) {
        l.n_o = 0;
        l.n_q = 0;
        std::fill(l.pos_o.begin(), l.pos_o.end(), -1);
        std::fill(l.pos_q.begin(), l.pos_q.end(), -1);
    }
    pos_max = -1;
    pos_planned_max = -1;
    pending.clear();
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
        return false; // a hole in the middle: only a plan evicts
    }
    if (p0 <= seq_pos_min(0)) {
        clear(false);
        return true;
    }
    if (!pending.empty() || p0 <= pos_planned_max) {
        // a pending plan names the rows as they are; a tailored cache cannot get removed tokens back
        return false;
    }
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

void llama_kv_cache_arkv::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    GGML_UNUSED(p0); GGML_UNUSED(p1);
    if (seq_id_src != seq_id_dst) {
        LLAMA_LOG_ERROR("%s: ARKV serves one sequence: seq_cp(%d, %d) ignored\n", __func__, seq_id_src, seq_id_dst);
    }
}

void llama_kv_cache_arkv::seq_keep(llama_seq_id seq_id) {
    GGML_UNUSED(seq_id); // one sequence: nothing else to drop
}

void llama_kv_cache_arkv::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    GGML_UNUSED(seq_id); GGML_UNUSED(p0); GGML_UNUSED(p1);
    if (shift != 0) {
        LLAMA_LOG_ERROR("%s: ARKV cannot shift positions (get_can_shift() is false)\n", __func__);
    }
}

void llama_kv_cache_arkv::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    GGML_UNUSED(seq_id); GGML_UNUSED(p0); GGML_UNUSED(p1);
    if (d != 1) {
        LLAMA_LOG_ERROR("%s: ARKV cannot divide positions (get_can_shift() is false)\n", __func__);
    }
}

llama_pos llama_kv_cache_arkv::pos_min_slow() const {
    llama_pos res = std::numeric_limits<llama_pos>::max();
    for (const auto & l : layers) {
        for (size_t i = 0; i < (size_t) l.n_o*n_head_kv_; ++i) {
            res = std::min(res, l.pos_o[i]);
        }
        for (size_t i = 0; i < (size_t) l.n_q*n_head_kv_; ++i) {
            res = std::min(res, l.pos_q[i]);
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
    return ret;
}

llama_arkv_layer_info llama_kv_cache_arkv::layer_info(uint32_t i) const {
    const auto & l = layers[i];
    llama_arkv_layer_info res;
    res.cap_o = l.cap_o;
    res.cap_q = l.cap_q;
    res.n_o   = l.n_o;
    res.n_q   = l.n_q;
    res.bytes_alloc = 2*arena_bytes;
    res.bytes_used  = 2*((size_t) l.n_o*row_bytes_o() + (size_t) l.n_q*row_bytes_q());
    return res;
}

//
// plans
//

std::string llama_kv_cache_arkv::submit_plan(const llama_arkv_layer_plan * plans) {
    std::vector<layer_move> moves;
    const uint32_t H = n_head_kv_;
    for (uint32_t li = 0; li < layers.size(); ++li) {
        const auto & l = layers[li];
        const auto & p = plans[li];
        const std::string where = "layer " + std::to_string(li) + ": ";
        if (p.cap_o < 1 || (size_t) p.cap_o*row_bytes_o() > arena_bytes) {
            return where + "cap_o = " + std::to_string(p.cap_o) + " is outside [1, " +
                   std::to_string(arena_bytes/row_bytes_o()) + "]";
        }
        if (p.n_o > p.cap_o) {
            return where + "n_o = " + std::to_string(p.n_o) + " exceeds cap_o = " + std::to_string(p.cap_o);
        }
        if (p.n_q > cap_q_for(p.cap_o)) {
            return where + "n_q = " + std::to_string(p.n_q) + " exceeds the " + std::to_string(cap_q_for(p.cap_o)) +
                   " Q slots left by cap_o = " + std::to_string(p.cap_o);
        }
        if ((p.n_o > 0 && !p.o_src) || (p.n_q > 0 && (!p.q_src || !p.q_from_o))) {
            return where + "missing source arrays";
        }
        layer_move m;
        m.li = li; m.cap_o = p.cap_o; m.n_o = p.n_o; m.n_q = p.n_q;
        m.o_src.assign(p.o_src, p.o_src + (size_t) p.n_o*H);
        m.q_src.assign(p.q_src, p.q_src + (size_t) p.n_q*H);
        m.q_from_o.assign(p.q_from_o, p.q_from_o + (size_t) p.n_q*H);
        for (uint32_t h = 0; h < H; ++h) {
            std::vector<uint8_t> used_o(l.n_o, 0), used_q(l.n_q, 0);
            auto take = [&](bool from_o, int32_t s) -> std::string {
                const uint32_t n = from_o ? l.n_o : l.n_q;
                if (s < 0 || (uint32_t) s >= n) {
                    return where + "head " + std::to_string(h) + " names " + (from_o ? "O" : "Q") + " slot " +
                           std::to_string(s) + ", which is not in use (" + std::to_string(n) + " in use)";
                }
                auto & used = from_o ? used_o : used_q;
                if (used[s]) {
                    return where + "head " + std::to_string(h) + " names " + (from_o ? "O" : "Q") + " slot " +
                           std::to_string(s) + " twice";
                }
                used[s] = 1;
                return "";
            };
            for (uint32_t s = 0; s < p.n_o; ++s) {
                if (auto err = take(true, m.o_src[s*H + h]); !err.empty()) {
                    return err;
                }
            }
            for (uint32_t s = 0; s < p.n_q; ++s) {
                if (auto err = take(m.q_from_o[s*H + h] != 0, m.q_src[s*H + h]); !err.empty()) {
                    return err;
                }
            }
        }
        moves.push_back(std::move(m));
    }
    pending = std::move(moves);
    return "";
}

void llama_kv_cache_arkv::reset_scores() {
    for (auto & l : layers) {
        ggml_backend_tensor_memset(l.acc_o, 0, 0, ggml_nbytes(l.acc_o));
        ggml_backend_tensor_memset(l.acc_q, 0, 0, ggml_nbytes(l.acc_q));
    }
    n_scored = 0;
}

// move rows into the new layout: gather every kept row (f16 O rows, dequantized Q rows) first,
// then scatter into the new pools, so that old and new layouts may overlap in the arena.
// Q rows re-quantize to the same bytes: a Q4_0/Q4_1/Q8_0 row's extreme value maps back to its scale.
bool llama_kv_cache_arkv::apply_plan(llama_context * lctx) {
    const uint32_t H = n_head_kv_;
    const int64_t D = head_dim_;

    ctx_retired.clear();
    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ggml_context_ptr ctx_new(ggml_init(ip));

    // our own graph: a plan moves up to 6 pools per layer, more nodes than the reserve graph holds
    const size_t n_nodes = 48*layers.size() + 16;
    ggml_init_params gp = { n_nodes*ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx_graph(ggml_init(gp));
    ggml_context * ctx = ctx_graph.get();
    ggml_cgraph  * gf  = ggml_new_graph_custom(ctx, n_nodes, false);
    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);

    struct idx_input {
        ggml_tensor * t;
        std::vector<int64_t> data; // converted to the tensor's type when set
    };
    std::vector<idx_input> inputs;
    auto make_idx = [&](ggml_type type, std::vector<int64_t> data) -> ggml_tensor * {
        if (data.empty()) {
            return nullptr;
        }
        ggml_tensor * t = ggml_new_tensor_1d(ctx, type, data.size());
        ggml_set_input(t);
        inputs.push_back({t, std::move(data)});
        return t;
    };

    std::vector<layer> old_layers = layers; // tensors and metadata of the current layout

    for (const auto & m : pending) {
        const layer & lo = old_layers[m.li];
        layer & ln = layers[m.li];
        place_pools(ctx_new.get(), ln, m.cap_o);

        // row r of a pool viewed as [D, H*cap] is (slot r/H, head r%H)
        std::vector<int64_t> o_keep, o_dst, qo_src, qo_dst, qq_src, qq_dst;
        for (uint32_t s = 0; s < m.n_o; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                o_keep.push_back((int64_t) m.o_src[s*H + h]*H + h);
                o_dst.push_back((int64_t) s*H + h);
            }
        }
        for (uint32_t s = 0; s < m.n_q; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                const int64_t src = (int64_t) m.q_src[s*H + h]*H + h;
                auto & sv = m.q_from_o[s*H + h] ? qo_src : qq_src;
                auto & dv = m.q_from_o[s*H + h] ? qo_dst : qq_dst;
                sv.push_back(src);
                dv.push_back((int64_t) s*H + h);
            }
        }

        // this layer's gathers all run before its scatters: its old and new pools may overlap
        std::vector<ggml_tensor *> gathers;
        std::vector<ggml_tensor *> scatters;

        // K and V move the same rows: one set of index inputs for both
        ggml_tensor * i_o_keep = make_idx(GGML_TYPE_I32, std::move(o_keep));
        ggml_tensor * i_o_dst  = make_idx(GGML_TYPE_I64, std::move(o_dst));
        ggml_tensor * i_qo_src = make_idx(GGML_TYPE_I32, std::move(qo_src));
        ggml_tensor * i_qo_dst = make_idx(GGML_TYPE_I64, std::move(qo_dst));
        ggml_tensor * i_qq_src = make_idx(GGML_TYPE_I32, std::move(qq_src));
        ggml_tensor * i_qq_dst = make_idx(GGML_TYPE_I64, std::move(qq_dst));

        for (int kv = 0; kv < 2; ++kv) {
            ggml_tensor * old_o = kv == 0 ? lo.k_o : lo.v_o;
            ggml_tensor * old_q = kv == 0 ? lo.k_q : lo.v_q;
            ggml_tensor * new_o = kv == 0 ? ln.k_o : ln.v_o;
            ggml_tensor * new_q = kv == 0 ? ln.k_q : ln.v_q;

            // pools viewed as rows of one head: [D, H*cap]
            auto rows = [&](ggml_tensor * pool) { return ggml_reshape_2d(ctx, pool, D, ggml_nelements(pool)/D); };
            auto move = [&](ggml_tensor * src_pool, ggml_tensor * src_idx, ggml_tensor * dst_pool, ggml_tensor * dst_idx) {
                if (!src_idx) {
                    return;
                }
                ggml_tensor * g = ggml_get_rows(ctx, rows(src_pool), src_idx); // F32 [D, n]
                gathers.push_back(g);
                scatters.push_back(ggml_set_rows(ctx, rows(dst_pool), g, dst_idx));
            };
            move(old_o, i_o_keep, new_o, i_o_dst);
            move(old_o, i_qo_src, new_q, i_qo_dst);
            move(old_q, i_qq_src, new_q, i_qq_dst);
        }
        // layer by layer, so the allocator reuses one layer's gathered rows for the next
        for (auto * g : gathers) {
            ggml_build_forward_expand(gf, g);
        }
        for (auto * sc : scatters) {
            ggml_build_forward_expand(gf, sc);
        }

        // host metadata follows the rows
        std::fill(ln.pos_o.begin(), ln.pos_o.end(), -1);
        std::fill(ln.pos_q.begin(), ln.pos_q.end(), -1);
        for (uint32_t s = 0; s < m.n_o; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                ln.pos_o[s*H + h] = lo.pos_o[(size_t) m.o_src[s*H + h]*H + h];
            }
        }
        for (uint32_t s = 0; s < m.n_q; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                const auto & from = m.q_from_o[s*H + h] ? lo.pos_o : lo.pos_q;
                ln.pos_q[s*H + h] = from[(size_t) m.q_src[s*H + h]*H + h];
            }
        }
        ln.n_o = m.n_o;
        ln.n_q = m.n_q;
    }
    pending.clear();

    bool ok = true;
    if (ggml_graph_n_nodes(gf) > 0) {
        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            LLAMA_LOG_ERROR("%s: failed to allocate the ARKV plan graph\n", __func__);
            ok = false;
        } else {
            for (auto & in : inputs) {
                if (in.t->type == GGML_TYPE_I32) {
                    std::vector<int32_t> d32(in.data.begin(), in.data.end());
                    ggml_backend_tensor_set(in.t, d32.data(), 0, d32.size()*sizeof(int32_t));
                } else {
                    ggml_backend_tensor_set(in.t, in.data.data(), 0, in.data.size()*sizeof(int64_t));
                }
            }
            ok = lctx->graph_compute(gf, false) == GGML_STATUS_SUCCESS;
            ggml_backend_sched_synchronize(sched);
            if (!ok) {
                LLAMA_LOG_ERROR("%s: failed to compute the ARKV plan graph\n", __func__);
            }
        }
    }

    ctx_retired.push_back(std::move(ctx_pools));
    ctx_pools = std::move(ctx_new);
    pools_generation++;
    for (const auto & l : layers) {
        clear_o_tail(l); // after the moves: the tail may overlap rows the graph gathered
    }
    pos_planned_max = pos_max;
    reset_scores();
    return ok;
}

void llama_kv_cache_arkv::get_scores(float * sum_o, float * sum_sq_o, float * sum_q, float * sum_sq_q) const {
    size_t off_o = 0;
    size_t off_q = 0;
    auto get = [&](ggml_tensor * acc, uint32_t cap, float * sum, float * sum_sq, size_t & off) {
        const size_t n = (size_t) cap*n_head_kv_;
        if (n > 0) {
            ggml_backend_tensor_get(acc, sum + off, 0, n*sizeof(float));
            ggml_backend_tensor_get(acc, sum_sq + off, acc->nb[2], n*sizeof(float));
        }
        off += n;
    };
    for (const auto & l : layers) {
        get(l.acc_o, l.cap_o, sum_o, sum_sq_o, off_o);
        get(l.acc_q, l.cap_q, sum_q, sum_sq_q, off_q);
    }
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
// graph
//

bool llama_kv_cache_arkv::layout::operator==(const layout & other) const {
    if (n_old != other.n_old || n_mask != other.n_mask || stats != other.stats || pools != other.pools ||
        views.size() != other.views.size()) {
        return false;
    }
    for (size_t i = 0; i < views.size(); ++i) {
        const auto & a = views[i];
        const auto & b = other.views[i];
        if (a.n_q != b.n_q || a.n_o_pad != b.n_o_pad || a.start != b.start) {
            return false;
        }
    }
    return true;
}

// layer l reads [Q rows | O rows (old, then the ubatch's new ones, then padding)]. All layers share one
// mask [n_mask, n_tokens]: columns < n_old are visible, then the new tokens (causal), then masked. Layer l
// uses the window starting at start_l = n_old - (n_q_l + n_o_old_l); while tokens are appended, start_l
// and the window width stay constant, so the graph can be reused.
llama_kv_cache_arkv::layout llama_kv_cache_arkv::make_layout(uint32_t n_tokens, bool worst_case) const {
    layout lay;
    lay.pools = pools_generation;
    lay.views.resize(layers.size());
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & l = layers[i];
        auto & v = lay.views[i];
        v.n_q     = worst_case ? l.cap_q : l.n_q;
        v.n_o     = worst_case ? l.cap_o : l.n_o;
        v.n_o_pad = worst_case ? l.cap_o : arkv_pad_o(l.n_o, l.cap_o);
        const uint32_t n_o_old = v.n_o >= n_tokens ? v.n_o - n_tokens : 0;
        lay.n_old = std::max(lay.n_old, v.n_q + n_o_old);
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        auto & v = lay.views[i];
        const uint32_t n_o_old = v.n_o >= n_tokens ? v.n_o - n_tokens : 0;
        v.start = lay.n_old - (v.n_q + n_o_old);
        lay.n_mask = std::max(lay.n_mask, v.start + v.n_q + v.n_o_pad);
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
    n_scored += std::min(ubatch.n_tokens, params.n_score_queries);
}

ggml_tensor * llama_kv_cache_arkv::build_input_rot(ggml_context * ctx, int64_t n) const {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);
    ggml_set_input(t);
    ggml_set_name(t, "arkv_inp_rot");
    return t;
}

// orthonormal Sylvester Walsh-Hadamard matrix, as llama.cpp's (the CPU/CUDA fast paths assume exactly it)
void llama_kv_cache_arkv::set_input_rot(ggml_tensor * dst) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const int n = dst->ne[0];
    float * data = (float *) dst->data;
    data[0] = 1.0f/sqrtf(n);
    for (int s = 1; s < n; s *= 2) {
        for (int i = 0; i < s; i++) {
            for (int j = 0; j < s; j++) {
                const float val = data[i*n + j];
                data[(i + s)*n + j]       =  val;
                data[i*n + (j + s)]       =  val;
                data[(i + s)*n + (j + s)] = -val;
            }
        }
    }
}

// per layer, the O rows the ubatch's tokens go to: I64 [n_tokens, n_layer]
void llama_kv_cache_arkv::set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    int64_t * data = (int64_t *) dst->data;
    const uint32_t n = ubatch->n_tokens;
    for (size_t li = 0; li < layers.size(); ++li) {
        const uint32_t first = layers[li].n_o - n; // apply() already counted them
        for (uint32_t i = 0; i < n; ++i) {
            data[li*n + i] = first + i;
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

ggml_tensor * llama_kv_cache_arkv::build_kv(llm_graph_context & gctx, llm_graph_input_attn_kv_arkv * inp,
                                            ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur, float kq_scale,
                                            int il, ggml_tensor ** k_out, ggml_tensor ** v_out) const {
    ggml_context * ctx0 = gctx.ctx0;
    ggml_cgraph  * gf   = gctx.gf;

    const int32_t li = map_layer_ids[il];
    GGML_ASSERT(li >= 0);
    const auto & l = layers[li];
    const auto & v = inp->lay.views[li];

    const int64_t H  = n_head_kv_;
    const int64_t D  = head_dim_;
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t n_kv = v.n_q + v.n_o_pad;

    // store the ubatch's K/V into the O pool
    ggml_tensor * idxs = ggml_view_1d(ctx0, inp->self_k_idxs, n_tokens, li*n_tokens*ggml_element_size(inp->self_k_idxs));
    ggml_tensor * stored[2];
    for (int i = 0; i < 2; ++i) {
        ggml_tensor * cur = i == 0 ? k_cur : v_cur;
        GGML_ASSERT(ggml_row_size(cur->type, D) == cur->nb[1]);
        ggml_tensor * rows = ggml_view_2d(ctx0, cur, D*H, n_tokens, cur->nb[2], 0);
        stored[i] = ggml_set_rows(ctx0, i == 0 ? l.k_o : l.v_o, rows, idxs);
        ggml_build_forward_expand(gf, stored[i]);
    }

    // small ubatches over Q rows in host pools: one fused pass that reads Q rows as they are and yields
    // the scores (layers with only O rows keep llama.cpp's attention: bit-exact with the stock cache)
    const int64_t n_sel = std::min<int64_t>(n_tokens, params.n_score_queries);
    if (params.fused && n_tokens <= ARKV_FUSED_MAX_TOKENS && !inp->lay.stats && v.n_q > 0 &&
        !gctx.hparams.attn_soft_cap && llama_arkv_attn_cpu_available() && ggml_backend_buffer_is_host(l.k_o->buffer)) {
        llama_arkv_attn_params & ap = inp->attn[li];
        ap.scale   = kq_scale;
        ap.n_head  = q_cur->ne[1];
        ap.n_q     = v.n_q;
        ap.n_o     = v.n_o_pad;
        ap.start   = v.start;
        ap.n_sel   = n_sel;
        ap.n_chunk = std::clamp<int32_t>(n_kv/64, 1, 64);
        return llama_arkv_attn_cpu(ctx0, q_cur, l.k_q, l.v_q, stored[0], stored[1], inp->self_kq_mask,
                                   n_sel ? l.acc_q : nullptr, n_sel ? l.acc_o : nullptr, &ap);
    }

    // [Q rows dequantized to f16 | O rows], viewed as [D, H, n_kv]
    auto read = [&](ggml_tensor * pool_o, ggml_tensor * pool_q) -> ggml_tensor * {
        if (v.n_q == 0) {
            return ggml_view_3d(ctx0, pool_o, D, H, v.n_o_pad, ggml_row_size(pool_o->type, D), pool_o->nb[1], 0);
        }
        ggml_tensor * o = ggml_view_2d(ctx0, pool_o, D*H, v.n_o_pad, pool_o->nb[1], 0);
        ggml_tensor * q_rows = ggml_view_2d(ctx0, pool_q, D*H, v.n_q, pool_q->nb[1], 0);
        ggml_tensor * ar = ggml_view_1d(ctx0, inp->q_arange, v.n_q, 0);
        ggml_tensor * deq = ggml_cast(ctx0, ggml_get_rows(ctx0, q_rows, ar), GGML_TYPE_F16);
        return ggml_reshape_3d(ctx0, ggml_concat(ctx0, deq, o, 1), D, H, n_kv);
    };
    ggml_tensor * k = read(l.k_o, l.k_q);
    ggml_tensor * vv = read(l.v_o, l.v_q);

    // this layer's window of the shared mask (the mask ops need it contiguous)
    ggml_tensor * mask = inp->self_kq_mask;
    if (v.start != 0 || n_kv != mask->ne[0]) {
        mask = ggml_cont(ctx0, ggml_view_2d(ctx0, mask, n_kv, n_tokens, mask->nb[1], v.start*ggml_element_size(mask)));
    }
    inp->self_kq_mask_cnv = mask; // read by build_attn right after this hook, for this layer

    // heavy-hitter statistics: attention of the last queries, summed over them and over the GQA group
    if (n_sel > 0) {
        const int64_t n_head = q_cur->ne[1];
        const int64_t G = n_head/H;
        ggml_tensor * q = ggml_view_3d(ctx0, q_cur, D, n_head, n_sel, q_cur->nb[1], q_cur->nb[2], (n_tokens - n_sel)*q_cur->nb[2]);
        q = ggml_permute(ctx0, q, 0, 2, 1, 3);                                  // [D, n_sel, n_head]
        ggml_tensor * kq = ggml_mul_mat(ctx0, ggml_permute(ctx0, k, 0, 2, 1, 3), q); // [n_kv, n_sel, n_head]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        // the last n_sel rows of a contiguous mask are contiguous
        ggml_tensor * m_sel = ggml_view_2d(ctx0, mask, n_kv, n_sel, mask->nb[1], (n_tokens - n_sel)*mask->nb[1]);
        ggml_tensor * p_soft = ggml_soft_max_ext(ctx0, kq, m_sel, kq_scale, 0.0f);
        if (inp->lay.stats) {
            build_stats(ctx0, gf, l, p_soft, v.n_q + v.n_o - n_tokens + (n_tokens - n_sel));
        }
        ggml_tensor * p = ggml_reshape_4d(ctx0, p_soft, n_kv, n_sel, G, H);
        p = ggml_cont(ctx0, ggml_permute(ctx0, p, 3, 0, 1, 2));                 // [n_sel, G, H, n_kv]
        p = ggml_reshape_3d(ctx0, p, n_sel*G, H, n_kv);
        ggml_tensor * s1 = ggml_reshape_2d(ctx0, ggml_sum_rows(ctx0, p), H, n_kv);
        ggml_tensor * s2 = ggml_reshape_2d(ctx0, ggml_sum_rows(ctx0, ggml_sqr(ctx0, p)), H, n_kv);
        auto accumulate = [&](ggml_tensor * acc, ggml_tensor * s, size_t plane, int64_t col0, int64_t n) {
            if (n == 0) {
                return;
            }
            ggml_tensor * dst = ggml_view_2d(ctx0, acc, H, n, acc->nb[1], plane*acc->nb[2]);
            ggml_tensor * add = ggml_view_2d(ctx0, s, H, n, s->nb[1], col0*s->nb[1]);
            ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_add(ctx0, dst, add), dst));
        };
        accumulate(l.acc_q, s1, 0, 0, v.n_q);
        accumulate(l.acc_q, s2, 1, 0, v.n_q);
        accumulate(l.acc_o, s1, 0, v.n_q, v.n_o_pad);
        accumulate(l.acc_o, s2, 1, v.n_q, v.n_o_pad);
    }

    *k_out = k;
    *v_out = vv;
    return nullptr;
}

//
// state write/read
//

static constexpr uint32_t ARKV_STATE_MAGIC   = 0x564b5241; // "ARKV"
static constexpr uint32_t ARKV_STATE_VERSION = 1;

void llama_kv_cache_arkv::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    GGML_UNUSED(flags);
    GGML_ASSERT(seq_id <= 0);
    const uint32_t hdr[] = { ARKV_STATE_MAGIC, ARKV_STATE_VERSION, n_layer(), n_head_kv_, head_dim_, (uint32_t) params.type_q };
    io.write(hdr, sizeof(hdr));
    const uint64_t arena = arena_bytes;
    io.write(&arena, sizeof(arena));
    const llama_pos p[] = { pos_max, pos_planned_max };
    io.write(p, sizeof(p));
    for (const auto & l : layers) {
        const uint32_t counts[] = { l.cap_o, l.n_o, l.n_q };
        io.write(counts, sizeof(counts));
        io.write(l.pos_o.data(), (size_t) l.n_o*n_head_kv_*sizeof(llama_pos));
        io.write(l.pos_q.data(), (size_t) l.n_q*n_head_kv_*sizeof(llama_pos));
        if (l.n_o > 0) {
            io.write_tensor(l.k_o, 0, (size_t) l.n_o*row_bytes_o());
            io.write_tensor(l.v_o, 0, (size_t) l.n_o*row_bytes_o());
        }
        if (l.n_q > 0) {
            io.write_tensor(l.k_q, 0, (size_t) l.n_q*row_bytes_q());
            io.write_tensor(l.v_q, 0, (size_t) l.n_q*row_bytes_q());
        }
    }
}

void llama_kv_cache_arkv::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    GGML_UNUSED(flags);
    GGML_ASSERT(seq_id <= 0);
    uint32_t hdr[6];
    io.read(hdr, sizeof(hdr));
    uint64_t arena = 0;
    io.read(&arena, sizeof(arena));
    if (hdr[0] != ARKV_STATE_MAGIC || hdr[1] != ARKV_STATE_VERSION) {
        throw std::runtime_error("the saved state is not an ARKV cache state (version 1)");
    }
    if (hdr[2] != n_layer() || hdr[3] != n_head_kv_ || hdr[4] != head_dim_ || hdr[5] != (uint32_t) params.type_q ||
        arena != arena_bytes) {
        throw std::runtime_error("the saved ARKV state was made with another model, quant type or budget");
    }
    llama_pos p[2];
    io.read(p, sizeof(p));

    clear(false);
    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ggml_context_ptr ctx_new(ggml_init(ip));
    for (auto & l : layers) {
        uint32_t counts[3];
        io.read(counts, sizeof(counts));
        const uint32_t cap_o = counts[0];
        if (cap_o < 1 || (size_t) cap_o*row_bytes_o() > arena_bytes || counts[1] > cap_o || counts[2] > cap_q_for(cap_o)) {
            throw std::runtime_error("the saved ARKV state has an invalid layout");
        }
        place_pools(ctx_new.get(), l, cap_o);
        std::fill(l.pos_o.begin(), l.pos_o.end(), -1);
        std::fill(l.pos_q.begin(), l.pos_q.end(), -1);
        l.n_o = counts[1];
        l.n_q = counts[2];
        io.read(l.pos_o.data(), (size_t) l.n_o*n_head_kv_*sizeof(llama_pos));
        io.read(l.pos_q.data(), (size_t) l.n_q*n_head_kv_*sizeof(llama_pos));
        if (l.n_o > 0) {
            io.read_tensor(l.k_o, 0, (size_t) l.n_o*row_bytes_o());
            io.read_tensor(l.v_o, 0, (size_t) l.n_o*row_bytes_o());
        }
        if (l.n_q > 0) {
            io.read_tensor(l.k_q, 0, (size_t) l.n_q*row_bytes_q());
            io.read_tensor(l.v_q, 0, (size_t) l.n_q*row_bytes_q());
        }
    }
    ctx_retired.clear(); // graphs over those were built for an older generation: never reused
    ctx_retired.push_back(std::move(ctx_pools));
    ctx_pools = std::move(ctx_new);
    pools_generation++;
    for (const auto & l : layers) {
        clear_o_tail(l);
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
        return kv->apply_plan(lctx);
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
// graph input
//

void llm_graph_input_attn_kv_arkv::set_input(const llama_ubatch * ubatch) {
    const auto * kv = mctx_arkv->get_kv();
    kv->set_input_k_idxs(self_k_idxs, ubatch);
    kv->set_input_kq_mask(self_kq_mask, ubatch, lay);
    if (q_arange && q_arange->buffer) {
        int32_t * data = (int32_t *) q_arange->data;
        GGML_ASSERT(ggml_backend_buffer_is_host(q_arange->buffer));
        for (int64_t i = 0; i < q_arange->ne[0]; ++i) {
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
    inp->attn.resize(kv->n_layer()); // never resized again: the fused ops point into it

    inp->self_k_idxs = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, n_tokens*kv->n_layer());
    ggml_set_input(inp->self_k_idxs);
    ggml_set_name(inp->self_k_idxs, "arkv_inp_k_idxs");

    uint32_t n_q_max = 0;
    for (const auto & v : inp->lay.views) {
        n_q_max = std::max(n_q_max, v.n_q);
    }
    if (n_q_max > 0) {
        inp->q_arange = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_q_max);
        ggml_set_input(inp->q_arange);
        ggml_set_name(inp->q_arange, "arkv_inp_q_rows");
    }

    // flash attention requires an f16 mask
    inp->self_kq_mask = ggml_new_tensor_2d(ctx0, gctx.cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32,
                                           inp->lay.n_mask, n_tokens);
    ggml_set_input(inp->self_kq_mask);
    ggml_set_name(inp->self_kq_mask, "arkv_inp_kq_mask");
    inp->self_kq_mask_cnv = inp->self_kq_mask;

    if (kv->rotate_k()) {
        int64_t nrot = 64;
        while (kv->head_dim() % (2*nrot) == 0) {
            nrot *= 2;
        }
        inp->self_k_rot = kv->build_input_rot(ctx0, nrot);
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
    return kv ? 96*kv->n_layer() : 0; // store, dequant + concat, mask window, scores, statistics: ~75 per layer
}

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
