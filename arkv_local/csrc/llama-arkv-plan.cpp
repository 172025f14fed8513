// Tri-state KV memory (ARKV): plans. A plan (from Python) says, per layer and KV head, which rows stay
// in O, which go to Q (quantized now, or moved as they are) and, by omission, which are evicted; it is
// validated when submitted and applied before the next decode as a graph of gathers and scatters.

#include "llama-kv-cache-arkv.h"

#include "llama-context.h"
#include "llama-impl.h"

#include <string>
#include <vector>

static constexpr size_t ARKV_PLAN_NODES_PER_LAYER = 64; // per arena: 6 views, 3 gathers, 2 concats, 3 views, 3 scatters

//
// plans
//

std::string llama_kv_cache_arkv::submit_plan(const llama_arkv_layer_plan * plans) {
    std::vector<layer_move> moves;
    const uint32_t H = n_head_kv_;
    for (uint32_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & l = layers[ikv];
        const auto & p = plans[ikv];
        const std::string where = "layer " + std::to_string(ikv) + ": ";
        if (p.cap_o < 1 || (size_t) p.cap_o*row_bytes_o() > arena_bytes) {
            return where + "cap_o = " + std::to_string(p.cap_o) + " is outside [1, " +
                   std::to_string(arena_bytes/row_bytes_o()) + "]";
        }
        if (p.n_o > p.cap_o) {
            return where + "n_o = " + std::to_string(p.n_o) + " exceeds cap_o = " + std::to_string(p.cap_o);
        }
        if (p.n_q > cap_lo_for(p.cap_o)) {
            return where + "n_q = " + std::to_string(p.n_q) + " exceeds the " + std::to_string(cap_lo_for(p.cap_o)) +
                   " Q slots left by cap_o = " + std::to_string(p.cap_o);
        }
        if ((p.n_o > 0 && !p.o_src) || (p.n_q > 0 && (!p.q_src || !p.q_from_o))) {
            return where + "missing source arrays";
        }
        layer_move m;
        m.ikv = ikv; m.cap_o = p.cap_o; m.n_o = p.n_o; m.n_lo = p.n_q;
        m.o_src.assign(p.o_src, p.o_src + (size_t) p.n_o*H);
        m.lo_src.assign(p.q_src, p.q_src + (size_t) p.n_q*H);
        m.lo_from_o.assign(p.q_from_o, p.q_from_o + (size_t) p.n_q*H);
        for (uint32_t h = 0; h < H; ++h) {
            std::vector<uint8_t> used_o(l.n_o, 0), used_lo(l.n_lo, 0);
            auto take = [&](bool from_o, int32_t s) -> std::string {
                const uint32_t n = from_o ? l.n_o : l.n_lo;
                if (s < 0 || (uint32_t) s >= n) {
                    return where + "head " + std::to_string(h) + " names " + (from_o ? "O" : "Q") + " slot " +
                           std::to_string(s) + ", which is not in use (" + std::to_string(n) + " in use)";
                }
                auto & used = from_o ? used_o : used_lo;
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
                if (auto err = take(m.lo_from_o[s*H + h] != 0, m.lo_src[s*H + h]); !err.empty()) {
                    return err;
                }
            }
        }
        moves.push_back(std::move(m));
    }
    pending = std::move(moves);
    return "";
}

// index inputs of a plan graph, set once the graph is allocated
struct llama_kv_cache_arkv::plan_inputs {
    ggml_context * ctx;
    std::vector<std::pair<ggml_tensor *, std::vector<int64_t>>> idxs; // converted to the tensor's type when set

    ggml_tensor * make(ggml_type type, std::vector<int64_t> data) {
        if (data.empty()) {
            return nullptr;
        }
        ggml_tensor * t = ggml_new_tensor_1d(ctx, type, data.size());
        ggml_set_input(t);
        idxs.emplace_back(t, std::move(data));
        return t;
    }

    void set() const {
        for (const auto & [t, data] : idxs) {
            if (t->type == GGML_TYPE_I32) {
                std::vector<int32_t> d32(data.begin(), data.end());
                ggml_backend_tensor_set(t, d32.data(), 0, d32.size()*sizeof(int32_t));
            } else {
                ggml_backend_tensor_set(t, data.data(), 0, data.size()*sizeof(int64_t));
            }
        }
    }
};

// one layer's moves from lo's pools into ln's. Per arena, the kept rows (f16 O rows, dequantized LO rows) are
// gathered and joined into one staging tensor, and every scatter reads its rows from that staging tensor:
// the graph's own edges order all reads of the old layout before any write of the new one (the two overlap
// in the arena), whatever order a backend runs independent nodes in. LO rows re-quantize to the same bytes:
// a Q4_0/Q4_1/Q8_0 row's extreme value maps back to its scale.
void llama_kv_cache_arkv::build_plan_moves(ggml_context * ctx, ggml_cgraph * gf, plan_inputs & in, const layer & lo,
                                           const layer & ln, const layer_move & m) const {
    const uint32_t H = n_head_kv_;
    const int64_t  D = head_dim_;

    // row r of a pool viewed as [D, H*cap] is (slot r/H, head r%H)
    std::vector<int64_t> o_keep, o_dst, quant_src, quant_dst, move_src, move_dst;
    for (uint32_t s = 0; s < m.n_o; ++s) {
        for (uint32_t h = 0; h < H; ++h) {
            o_keep.push_back((int64_t) m.o_src[s*H + h]*H + h);
            o_dst.push_back((int64_t) s*H + h);
        }
    }
    for (uint32_t s = 0; s < m.n_lo; ++s) {
        for (uint32_t h = 0; h < H; ++h) {
            const bool from_o = m.lo_from_o[s*H + h];
            (from_o ? quant_src : move_src).push_back((int64_t) m.lo_src[s*H + h]*H + h);
            (from_o ? quant_dst : move_dst).push_back((int64_t) s*H + h);
        }
    }
    // K and V move the same rows: one set of index inputs for both
    struct move { ggml_tensor * src_idx; ggml_tensor * dst_idx; bool from_o; bool to_o; };
    const move moves[3] = {
        { in.make(GGML_TYPE_I32, std::move(o_keep)), in.make(GGML_TYPE_I64, std::move(o_dst)),  true,  true  },
        { in.make(GGML_TYPE_I32, std::move(quant_src)), in.make(GGML_TYPE_I64, std::move(quant_dst)), true,  false },
        { in.make(GGML_TYPE_I32, std::move(move_src)), in.make(GGML_TYPE_I64, std::move(move_dst)), false, false },
    };

    auto rows = [&](ggml_tensor * pool) { return ggml_reshape_2d(ctx, pool, D, ggml_nelements(pool)/D); };
    for (int kv = 0; kv < 2; ++kv) {
        ggml_tensor * staging = nullptr; // F32 [D, rows gathered]
        int64_t offs[3] = {};
        for (int i = 0; i < 3; ++i) {
            if (!moves[i].src_idx) {
                continue;
            }
            ggml_tensor * src = moves[i].from_o ? (kv ? lo.v_o : lo.k_o) : (kv ? lo.v_lo : lo.k_lo);
            ggml_tensor * g = ggml_get_rows(ctx, rows(src), moves[i].src_idx);
            offs[i] = staging ? staging->ne[1] : 0;
            staging = staging ? ggml_concat(ctx, staging, g, 1) : g;
        }
        for (int i = 0; i < 3; ++i) {
            if (!moves[i].src_idx) {
                continue;
            }
            ggml_tensor * dst = moves[i].to_o ? (kv ? ln.v_o : ln.k_o) : (kv ? ln.v_lo : ln.k_lo);
            const int64_t n = moves[i].src_idx->ne[0];
            ggml_tensor * part = ggml_view_2d(ctx, staging, D, n, staging->nb[1], offs[i]*staging->nb[1]);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, rows(dst), part, moves[i].dst_idx));
        }
    }
}

// host metadata of ln after the moves of m from lo
void llama_kv_cache_arkv::plan_metadata(const layer & lo, layer & ln, const layer_move & m) const {
    const uint32_t H = n_head_kv_;
    std::fill(ln.pos_o.begin(), ln.pos_o.end(), -1);
    std::fill(ln.pos_lo.begin(), ln.pos_lo.end(), -1);
    for (uint32_t s = 0; s < m.n_o; ++s) {
        for (uint32_t h = 0; h < H; ++h) {
            ln.pos_o[s*H + h] = lo.pos_o[(size_t) m.o_src[s*H + h]*H + h];
        }
    }
    for (uint32_t s = 0; s < m.n_lo; ++s) {
        for (uint32_t h = 0; h < H; ++h) {
            const auto & from = m.lo_from_o[s*H + h] ? lo.pos_o : lo.pos_lo;
            ln.pos_lo[s*H + h] = from[(size_t) m.lo_src[s*H + h]*H + h];
        }
    }
    ln.n_o = m.n_o;
    ln.n_lo = m.n_lo;
}

// apply the pending plan: build the next layout beside the current one, move the rows, and commit the
// layout only once the graph has computed. If the graph cannot be allocated, nothing moved and the cache
// stays as it was; if it fails while computing, rows may be half moved and the cache is cleared.
bool llama_kv_cache_arkv::apply_plan(llama_context * lctx) {
    ctx_retired.clear();
    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ggml_context_ptr ctx_new(ggml_init(ip));

    // our own graph: a plan moves up to 6 pools per layer, more nodes than the reserve graph holds
    const size_t n_nodes = ARKV_PLAN_NODES_PER_LAYER*layers.size() + 16;
    ggml_init_params gp = { n_nodes*ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx_graph(ggml_init(gp));
    ggml_cgraph * gf = ggml_new_graph_custom(ctx_graph.get(), n_nodes, false);
    plan_inputs in { ctx_graph.get(), {} };

    std::vector<layer> next = layers;
    for (const auto & m : pending) {
        place_pools(ctx_new.get(), next[m.ikv], m.cap_o);
        build_plan_moves(ctx_graph.get(), gf, in, layers[m.ikv], next[m.ikv], m);
        plan_metadata(layers[m.ikv], next[m.ikv], m);
    }
    pending.clear();

    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);
    if (ggml_graph_n_nodes(gf) > 0) {
        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            llama_arkv_set_error("could not allocate the graph that applies the plan: the cache is unchanged");
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
            return false;
        }
        in.set();
        const bool ok = lctx->graph_compute(gf, false) == GGML_STATUS_SUCCESS;
        ggml_backend_sched_synchronize(sched);
        if (!ok) {
            clear(true);
            llama_arkv_set_error("the graph that applies the plan failed: the cache was cleared");
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
            return false;
        }
    }

    // commit
    layers = std::move(next);
    ctx_retired.push_back(std::move(ctx_pools));
    ctx_pools = std::move(ctx_new);
    pools_generation++;
    for (const auto & l : layers) {
        clear_tails(l); // after the moves: the tails may overlap rows the graph gathered
    }
    pos_planned_max = pos_max;
    reset_scores();
    return true;
}
