// Tri-state KV memory (ARKV): plans. A plan (from Python) says, per layer and KV head, which rows go to
// O, to Q (quantized now, or moved as they are) and to S (spilled to host memory) and, by omission, which
// are evicted; it is validated when submitted and applied before the next decode as a graph of gathers and
// scatters.

#include "llama-kv-cache-arkv.h"

#include "llama-context.h"
#include "llama-impl.h"

#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

static const char * arkv_pool_name(int pool) {
    return pool == LLAMA_ARKV_POOL_O ? "O" : pool == LLAMA_ARKV_POOL_Q ? "Q" : "S";
}

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
        if (p.n_s > l.cap_s) {
            return where + "n_s = " + std::to_string(p.n_s) + " exceeds the " + std::to_string(l.cap_s) + " spill slots";
        }
        if ((p.n_o > 0 && !p.o_src) || (p.n_q > 0 && (!p.q_src || !p.q_from)) || (p.n_s > 0 && (!p.s_src || !p.s_from))) {
            return where + "missing source arrays";
        }
        layer_move m;
        m.ikv = ikv;
        m.cap_o = p.cap_o;
        const uint32_t  n[3]    = { p.n_q, p.n_o, p.n_s };
        const int32_t * src[3]  = { p.q_src, p.o_src, p.s_src };
        const uint8_t * from[3] = { p.q_from, p.o_from, p.s_from };
        for (int dst = 0; dst < 3; ++dst) {
            m.n[dst] = n[dst];
            m.src[dst].assign(src[dst], src[dst] + (size_t) n[dst]*H);
            if (from[dst]) {
                m.from[dst].assign(from[dst], from[dst] + (size_t) n[dst]*H);
            } else {
                m.from[dst].assign((size_t) n[dst]*H, LLAMA_ARKV_POOL_O);
            }
        }
        const uint32_t n_old[3] = { l.n_lo, l.n_o, l.n_s };
        for (uint32_t h = 0; h < H; ++h) {
            std::vector<uint8_t> used[3] = { std::vector<uint8_t>(l.n_lo, 0), std::vector<uint8_t>(l.n_o, 0),
                                             std::vector<uint8_t>(l.n_s, 0) };
            for (int dst = 0; dst < 3; ++dst) {
                for (uint32_t i = 0; i < m.n[dst]; ++i) {
                    const uint8_t pool = m.from[dst][i*H + h];
                    const int32_t slot = m.src[dst][i*H + h];
                    if (pool > LLAMA_ARKV_POOL_S) {
                        return where + "head " + std::to_string(h) + " names pool " + std::to_string(pool) + " (0: Q, 1: O, 2: S)";
                    }
                    if (slot < 0 || (uint32_t) slot >= n_old[pool]) {
                        return where + "head " + std::to_string(h) + " names " + arkv_pool_name(pool) + " slot " +
                               std::to_string(slot) + ", which is not in use (" + std::to_string(n_old[pool]) + " in use)";
                    }
                    if (used[pool][slot]) {
                        return where + "head " + std::to_string(h) + " names " + arkv_pool_name(pool) + " slot " +
                               std::to_string(slot) + " twice";
                    }
                    used[pool][slot] = 1;
                }
            }
        }
        moves.push_back(std::move(m));
    }
    pending = std::move(moves);
    return "";
}

//
// graph inputs
//

ggml_tensor * llama_kv_cache_arkv::plan_inputs::make(ggml_type type, std::vector<int64_t> data) {
    if (data.empty()) {
        return nullptr;
    }
    ggml_tensor * t = ggml_new_tensor_1d(ctx, type, data.size());
    ggml_set_input(t);
    idxs.emplace_back(t, std::move(data));
    return t;
}

ggml_tensor * llama_kv_cache_arkv::plan_inputs::make_f32(int64_t ne0, std::vector<float> data) {
    GGML_ASSERT(ne0 > 0 && data.size() % ne0 == 0);
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, data.size()/ne0);
    ggml_set_input(t);
    f32s.emplace_back(t, std::move(data));
    return t;
}

void llama_kv_cache_arkv::plan_inputs::set() const {
    for (const auto & [t, data] : idxs) {
        if (t->type == GGML_TYPE_I32) {
            std::vector<int32_t> d32(data.begin(), data.end());
            ggml_backend_tensor_set(t, d32.data(), 0, d32.size()*sizeof(int32_t));
        } else {
            ggml_backend_tensor_set(t, data.data(), 0, data.size()*sizeof(int64_t));
        }
    }
    for (const auto & [t, data] : f32s) {
        ggml_backend_tensor_set(t, data.data(), 0, data.size()*sizeof(float));
    }
}

ggml_tensor * llama_kv_cache_arkv::plan_inputs::place(ggml_tensor * node, const ggml_tensor * t) {
    const ggml_tensor * base = t->view_src ? t->view_src : t;
    GGML_ASSERT(base->buffer);
    placed.emplace_back(node, base->buffer);
    return node;
}

void llama_kv_cache_arkv::plan_inputs::place_all(ggml_backend_sched_t sched) const {
    for (const auto & [node, buf] : placed) {
        if (ggml_backend_t b = llama_arkv_backend_for(sched, buf)) {
            ggml_backend_sched_set_tensor_backend(sched, node, b);
        }
    }
}

ggml_backend_t llama_arkv_backend_for(ggml_backend_sched_t sched, ggml_backend_buffer_t buf) {
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(sched, i);
        if (ggml_backend_supports_buft(b, ggml_backend_buffer_get_type(buf))) {
            return b;
        }
    }
    return nullptr;
}

// a layer's K (v = false) or V pool, by llama_arkv_pool
ggml_tensor * llama_kv_cache_arkv::pool_of(const layer & l, int pool, bool v) const {
    switch (pool) {
        case LLAMA_ARKV_POOL_Q: return v ? l.v_lo : l.k_lo;
        case LLAMA_ARKV_POOL_O: return v ? l.v_o : l.k_o;
        default:                return v ? l.v_s : l.k_s;
    }
}

// one layer's moves from lo's pools into ln's. Per arena, the moved rows (f16 O rows, dequantized Q/S rows) are
// gathered into one staging tensor, and every scatter reads its rows from that staging tensor:
// the graph's own edges order all reads of the old layout before any write of the new one (the two overlap
// in the arena), whatever order a backend runs independent nodes in. A row whose bytes stay where they are
// (same pool type, same address: an S row left in its slot, an O row in its slot) is not moved at all.
// Quantized rows re-quantize to the same bytes: a Q4_0/Q4_1/Q8_0 row's extreme value maps back to its scale.
void llama_kv_cache_arkv::build_plan_moves(ggml_context * ctx, ggml_cgraph * gf, plan_inputs & in, const layer & lo,
                                           const layer & ln, const layer_move & m) const {
    const uint32_t H = n_head_kv_;
    const int64_t  D = head_dim_;

    // row r of a pool viewed as [D, H*cap] is (slot r/H, head r%H); moves grouped by (source, destination) pool
    std::vector<int64_t> src_rows[3][3], dst_rows[3][3];
    for (int dst = 0; dst < 3; ++dst) {
        ggml_tensor * pd = pool_of(ln, dst, false);
        for (uint32_t s = 0; s < m.n[dst]; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                const int from = m.from[dst][s*H + h];
                const int64_t r_src = (int64_t) m.src[dst][s*H + h]*H + h;
                const int64_t r_dst = (int64_t) s*H + h;
                ggml_tensor * ps = pool_of(lo, from, false);
                if (ps->type == pd->type && ps->view_src == pd->view_src && ps->data == pd->data && r_src == r_dst) {
                    continue; // stays where it is
                }
                src_rows[from][dst].push_back(r_src);
                dst_rows[from][dst].push_back(r_dst);
            }
        }
    }
    // K and V move the same rows: one set of index inputs for both
    struct move { ggml_tensor * src_idx; ggml_tensor * dst_idx; int from; int to; };
    std::vector<move> moves;
    for (int from = 0; from < 3; ++from) {
        for (int dst = 0; dst < 3; ++dst) {
            if (!src_rows[from][dst].empty()) {
                moves.push_back({ in.make(GGML_TYPE_I32, std::move(src_rows[from][dst])),
                                  in.make(GGML_TYPE_I64, std::move(dst_rows[from][dst])), from, dst });
            }
        }
    }

    if (moves.empty()) {
        return;
    }
    // each move's rows land in a range of the staging tensor: offsets, and the row indices of those ranges
    std::vector<int64_t> offs;
    int64_t n_staged = 0;
    for (const auto & mv : moves) {
        offs.push_back(n_staged);
        n_staged += mv.src_idx->ne[0];
    }
    ggml_tensor * staged_idx = nullptr; // an input must be in the graph: only when rows are staged
    if (moves.size() > 1) {
        std::vector<int64_t> staged_rows(n_staged);
        std::iota(staged_rows.begin(), staged_rows.end(), 0);
        staged_idx = in.make(GGML_TYPE_I64, std::move(staged_rows));
    }

    auto rows = [&](ggml_tensor * pool) { return ggml_reshape_2d(ctx, pool, D, ggml_nelements(pool)/D); };
    ggml_tensor * last_s = nullptr; // the last gather from or scatter into S
    for (int kv = 0; kv < 2; ++kv) {
        // F32 [D, n_staged]: the first move's rows padded to the full size, then each further range written by a
        // chain of set_rows (one row copy each; a chain of concats copied every row gathered so far at each step, on
        // one thread: 190 ms of a 4k-token prefill plan). A node, not a new tensor: the graph allocator keeps a
        // leaf for the whole graph, so every layer's staging would be live at once.
        // Placed by hand: gathers where their pool lies, the staging beside the arena. Left to the scheduler, a
        // gather from the spill in host memory ran on the device and copied the whole spill there, once per move
        // from it, and the staging could land on the CPU, copying whole device pools to the host.
        ggml_tensor * arena = kv ? lo.v_arena : lo.k_arena;
        ggml_tensor * staging = nullptr;
        for (size_t i = 0; i < moves.size(); ++i) {
            ggml_tensor * pool = pool_of(lo, moves[i].from, kv);
            ggml_tensor * g = in.place(ggml_get_rows(ctx, rows(pool), moves[i].src_idx), pool);
            last_s = moves[i].from == LLAMA_ARKV_POOL_S ? g : last_s;
            const int64_t n = moves[i].src_idx->ne[0];
            if (i == 0) {
                staging = moves.size() == 1 ? g : in.place(ggml_pad(ctx, g, 0, (int) (n_staged - n), 0, 0), arena);
            } else {
                staging = in.place(ggml_set_rows(ctx, staging, g, ggml_view_1d(ctx, staged_idx, n, offs[i]*ggml_element_size(staged_idx))),
                                   arena);
            }
        }
        // scatters into the arena first, then into S: one switch of backend per arena, not one per move
        for (const bool to_s : { false, true }) {
            for (size_t i = 0; i < moves.size(); ++i) {
                if ((moves[i].to == LLAMA_ARKV_POOL_S) != to_s) {
                    continue;
                }
                const int64_t n = moves[i].src_idx->ne[0];
                ggml_tensor * pool = pool_of(ln, moves[i].to, kv);
                ggml_tensor * part = ggml_view_2d(ctx, staging, D, n, staging->nb[1], offs[i]*staging->nb[1]);
                ggml_tensor * scatter = in.place(ggml_set_rows(ctx, rows(pool), part, moves[i].dst_idx), pool);
                last_s = to_s ? scatter : last_s;
                ggml_build_forward_expand(gf, scatter);
            }
        }
    }
    // kv_spill="disk": this layer's pages of the spill file leave the process once its rows moved, so that a plan
    // keeps one layer's resident, not all: after the layer's last node over S (in host memory: the release op runs
    // there too). In graph order after the K rows' nodes as well; run earlier, it would cost residency, not data
    // (a shared mapping's pages map again from the file)
    if (spill_map && last_s) {
        ggml_build_forward_expand(gf, build_release_spill(ctx, last_s, m.ikv));
    }
}

// host metadata of ln after the moves of m from lo
void llama_kv_cache_arkv::plan_metadata(const layer & lo, layer & ln, const layer_move & m) const {
    const uint32_t H = n_head_kv_;
    const std::vector<llama_pos> * old_pos[3] = { &lo.pos_lo, &lo.pos_o, &lo.pos_s };
    std::vector<llama_pos> * new_pos[3] = { &ln.pos_lo, &ln.pos_o, &ln.pos_s };
    for (int dst = 0; dst < 3; ++dst) {
        std::fill(new_pos[dst]->begin(), new_pos[dst]->end(), -1);
        for (uint32_t s = 0; s < m.n[dst]; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                const int from = m.from[dst][s*H + h];
                (*new_pos[dst])[s*H + h] = (*old_pos[from])[(size_t) m.src[dst][s*H + h]*H + h];
            }
        }
    }
    ln.n_lo = m.n[LLAMA_ARKV_POOL_Q];
    ln.n_o  = m.n[LLAMA_ARKV_POOL_O];
    ln.n_s  = m.n[LLAMA_ARKV_POOL_S];
}

// run a graph of row moves or shifts over the pools, now. If it cannot be allocated nothing ran; if it fails
// while computing, rows may be half moved and the cache is cleared.
llama_kv_cache_arkv::graph_status llama_kv_cache_arkv::compute_update_graph(llama_context * lctx, ggml_cgraph * gf,
                                                                            const plan_inputs & in, const char * what) {
    if (ggml_graph_n_nodes(gf) == 0) {
        return GRAPH_DONE;
    }
    // fault injection for the tests (no way to make a backend fail on purpose):
    // ARKV_DEBUG_FAIL_UPDATE=alloc or =compute fails every update graph at that step
    const char * fail = getenv("ARKV_DEBUG_FAIL_UPDATE");
    const std::string fail_at = fail ? fail : "";
    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);
    in.place_all(sched);
    if (fail_at == "alloc" || !ggml_backend_sched_alloc_graph(sched, gf)) {
        return GRAPH_NOT_ALLOCATED;
    }
    in.set();
    const bool ok = fail_at != "compute" && lctx->graph_compute(gf, false) == GGML_STATUS_SUCCESS;
    ggml_backend_sched_synchronize(sched);
    release_spill_pages(); // the spilled rows a plan or shift wrote need not stay resident
    if (!ok) {
        clear(true);
        llama_arkv_set_error(std::string("the graph that applies ") + what + " failed: the cache was cleared");
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
        return GRAPH_FAILED;
    }
    return GRAPH_DONE;
}

// everything pending, in the order it was meant: rows seq_rm removed go first (the metadata shows them gone
// already), then the K shift of seq_add (over the rows as the metadata shows them), then the plan (whose
// slots are the metadata's). A removal or shift that fails clears the cache: its metadata would lie.
bool llama_kv_cache_arkv::apply_update(llama_context * lctx) {
    if (!pending_rm.empty() && !apply_removal(lctx)) {
        return false;
    }
    if (has_shift && !apply_shift(lctx)) {
        return false;
    }
    return pending.empty() || apply_plan(lctx);
}

// apply the pending plan: build the next layout beside the current one, move the rows, and commit the
// layout only once the graph has computed. If the graph cannot be allocated, nothing moved and the cache
// stays as it was; if it fails while computing, rows may be half moved and the cache is cleared.
bool llama_kv_cache_arkv::apply_plan(llama_context * lctx) {
    ctx_retired.clear();
    ggml_init_params ip = { size_t(4u*layers.size()*ggml_tensor_overhead()), nullptr, true };
    ggml_context_ptr ctx_new(ggml_init(ip));

    // our own graph: a plan moves up to 6 pools per layer, more nodes than the reserve graph holds
    const size_t n_nodes = PLAN_NODES_PER_LAYER*layers.size() + 16;
    ggml_init_params gp = { n_nodes*ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx_graph(ggml_init(gp));
    ggml_cgraph * gf = ggml_new_graph_custom(ctx_graph.get(), n_nodes, false);
    plan_inputs in { ctx_graph.get(), {}, {} };

    std::vector<layer> next = layers;
    for (const auto & m : pending) {
        place_pools(ctx_new.get(), next[m.ikv], m.cap_o);
        build_plan_moves(ctx_graph.get(), gf, in, layers[m.ikv], next[m.ikv], m);
        plan_metadata(layers[m.ikv], next[m.ikv], m);
    }
    pending.clear();

    switch (compute_update_graph(lctx, gf, in, "the plan")) {
        case GRAPH_DONE: break;
        case GRAPH_NOT_ALLOCATED:
            llama_arkv_set_error("could not allocate the graph that applies the plan: the cache is unchanged");
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
            return false;
        case GRAPH_FAILED:
            return false; // cleared, error set
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
#if defined(__GLIBC__)
    // glibc keeps the pages that plans (ours and the policy's arrays in Python) free on its free lists, resident:
    // a long chat's RSS crept ~0.15 MiB per 1k tokens (bench soak). Hand them back, ~2 ms once per plan
    malloc_trim(0);
#endif
    return true;
}
