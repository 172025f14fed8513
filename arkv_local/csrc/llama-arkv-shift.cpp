// Tri-state KV memory (ARKV): seq_rm of a middle range and seq_add, which llama.cpp's context shift uses:
// seq_rm(seq, n_keep, n_keep + n_discard), then seq_add(seq, n_keep + n_discard, -1, -n_discard).
//
// Both change the host metadata at once, as llama.cpp's cells do, and the rows follow at the next update
// (init_update, or llama_arkv_apply_plan), before any plan:
// - removed rows leave every pool (O, LO and S); the rows kept are compacted by a move like a plan's, and
//   their score accumulators follow them (a plan resets them; this is no plan);
// - a shifted row's K is rotated by its position change, as llama_kv_cache::build_rope_shift does: in f32,
//   from f16 (O) or dequantized (LO, S) and stored back the same way (quantized rows quantize again), and
//   with the Walsh-Hadamard rotation on, turned back into the model's basis first and rotated after. Unlike
//   llama.cpp's, whose f16 caches are never rotated, our O rows are rotated too, and are shifted the same way.

#include "llama-kv-cache-arkv.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <string>
#include <vector>

static constexpr size_t ARKV_SHIFT_NODES_PER_LAYER = 64; // per pool: a gather, two rotations, a rope and a scatter, with reshapes

//
// removal
//

// the move that removes layer l's rows at positions in [p0, p1) from every pool, per KV head, keeping the
// others in their pools and in slot order. The heads of a layer share one mask, so each must keep as many
// attended (O + LO) rows, and as many spilled rows, as the others; when they keep them in different pools,
// each head's newest LO rows move into O (dequantized: the values attention read) until every head has as
// many O rows as the one with the most. Returns why it cannot be done, or "".
std::string llama_kv_cache_arkv::removal_move(const layer & l, uint32_t ikv, llama_pos p0, llama_pos p1,
                                              layer_move & m) const {
    const uint32_t H = n_head_kv_;
    const uint32_t n_old[3] = { l.n_lo, l.n_o, l.n_s };
    const std::vector<llama_pos> * pos[3] = { &l.pos_lo, &l.pos_o, &l.pos_s };
    auto pos_of = [&](int pool, int32_t slot, uint32_t h) { return (*pos[pool])[(size_t) slot*H + h]; };

    std::vector<std::vector<int32_t>> kept[3]; // [pool][head]: the slots kept, in slot order
    for (int d = 0; d < 3; ++d) {
        kept[d].resize(H);
        for (uint32_t s = 0; s < n_old[d]; ++s) {
            for (uint32_t h = 0; h < H; ++h) {
                const llama_pos p = pos_of(d, s, h);
                GGML_ASSERT(p >= 0);
                if (p < p0 || p >= p1) {
                    kept[d][h].push_back(s);
                }
            }
        }
    }
    const size_t n_att = kept[LLAMA_ARKV_POOL_O][0].size() + kept[LLAMA_ARKV_POOL_Q][0].size();
    const size_t n_s   = kept[LLAMA_ARKV_POOL_S][0].size();
    size_t t_o = 0;
    for (uint32_t h = 0; h < H; ++h) {
        const size_t att = kept[LLAMA_ARKV_POOL_O][h].size() + kept[LLAMA_ARKV_POOL_Q][h].size();
        if (att != n_att || kept[LLAMA_ARKV_POOL_S][h].size() != n_s) {
            return "layer " + std::to_string(ikv) + ": KV head 0 would keep " + std::to_string(n_att) + " attended and " +
                   std::to_string(n_s) + " spilled rows, head " + std::to_string(h) + " " + std::to_string(att) + " and " +
                   std::to_string(kept[LLAMA_ARKV_POOL_S][h].size()) + " (the heads hold different tokens of the range; "
                   "the heads of a layer share one mask and must hold as many rows: a plan that evicts the range first, "
                   "as many rows per head, makes it removable)";
        }
        t_o = std::max(t_o, kept[LLAMA_ARKV_POOL_O][h].size());
    }

    m = layer_move();
    m.ikv   = ikv;
    m.cap_o = l.cap_o;
    m.n[LLAMA_ARKV_POOL_Q] = n_att - t_o;
    m.n[LLAMA_ARKV_POOL_O] = t_o;
    m.n[LLAMA_ARKV_POOL_S] = n_s;
    for (int d = 0; d < 3; ++d) {
        m.n_old[d] = n_old[d];
        m.src[d].assign((size_t) m.n[d]*H, 0);
        m.from[d].assign((size_t) m.n[d]*H, (uint8_t) d);
    }
    GGML_ASSERT(m.n[LLAMA_ARKV_POOL_O] <= l.cap_o && m.n[LLAMA_ARKV_POOL_Q] <= l.cap_lo && m.n[LLAMA_ARKV_POOL_S] <= l.cap_s);

    for (uint32_t h = 0; h < H; ++h) {
        const auto & ko = kept[LLAMA_ARKV_POOL_O][h];
        std::vector<int32_t> kq = kept[LLAMA_ARKV_POOL_Q][h];
        // the newest LO rows go up into O
        const size_t n_up = t_o - ko.size();
        std::vector<int32_t> up;
        if (n_up > 0) {
            std::vector<int32_t> by_pos = kq;
            std::stable_sort(by_pos.begin(), by_pos.end(), [&](int32_t a, int32_t b) {
                return pos_of(LLAMA_ARKV_POOL_Q, a, h) > pos_of(LLAMA_ARKV_POOL_Q, b, h);
            });
            up.assign(by_pos.begin(), by_pos.begin() + n_up);
            kq.erase(std::remove_if(kq.begin(), kq.end(), [&](int32_t s) {
                return std::find(up.begin(), up.end(), s) != up.end();
            }), kq.end());
        }
        // O: its own rows and the ones moved up, in position order
        std::vector<std::pair<uint8_t, int32_t>> o_rows;
        for (int32_t s : ko) {
            o_rows.emplace_back(LLAMA_ARKV_POOL_O, s);
        }
        for (int32_t s : up) {
            o_rows.emplace_back(LLAMA_ARKV_POOL_Q, s);
        }
        std::stable_sort(o_rows.begin(), o_rows.end(), [&](const auto & a, const auto & b) {
            return pos_of(a.first, a.second, h) < pos_of(b.first, b.second, h);
        });
        for (size_t i = 0; i < o_rows.size(); ++i) {
            m.from[LLAMA_ARKV_POOL_O][i*H + h] = o_rows[i].first;
            m.src [LLAMA_ARKV_POOL_O][i*H + h] = o_rows[i].second;
        }
        GGML_ASSERT(kq.size() == m.n[LLAMA_ARKV_POOL_Q]);
        for (size_t i = 0; i < kq.size(); ++i) {
            m.src[LLAMA_ARKV_POOL_Q][i*H + h] = kq[i];
        }
        const auto & ks = kept[LLAMA_ARKV_POOL_S][h];
        for (size_t i = 0; i < ks.size(); ++i) {
            m.src[LLAMA_ARKV_POOL_S][i*H + h] = ks[i];
        }
    }
    return "";
}

// whether m leaves every row where it is
static bool arkv_is_identity(const uint32_t n[3], const uint32_t n_old[3], const std::vector<int32_t> src[3],
                             const std::vector<uint8_t> from[3], uint32_t H) {
    for (int d = 0; d < 3; ++d) {
        if (n[d] != n_old[d]) {
            return false;
        }
        for (size_t i = 0; i < src[d].size(); ++i) {
            if (from[d][i] != d || (uint32_t) src[d][i] != i/H) {
                return false;
            }
        }
    }
    return true;
}

// remove the rows at positions in [p0, p1) from every layer, pool and head: the metadata now, the rows at the
// next update. False (nothing changed, llama_arkv_last_error says why) where some layer cannot (see
// removal_move) or a plan is pending (its slots name the rows as they are).
bool llama_kv_cache_arkv::remove_rows(llama_pos p0, llama_pos p1) {
    const uint32_t H = n_head_kv_;
    std::vector<layer_move> moves(layers.size());
    bool any = false;
    for (uint32_t ikv = 0; ikv < layers.size(); ++ikv) {
        const std::string err = removal_move(layers[ikv], ikv, p0, p1, moves[ikv]);
        if (!err.empty()) {
            llama_arkv_set_error("cannot remove positions [" + std::to_string(p0) + ", " + std::to_string(p1) + "): " + err);
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
            return false;
        }
        const auto & m = moves[ikv];
        any = any || !arkv_is_identity(m.n, m.n_old, m.src, m.from, H);
    }
    if (!any) {
        return true; // no row in the range
    }
    if (!pending.empty()) {
        llama_arkv_set_error("cannot remove positions [" + std::to_string(p0) + ", " + std::to_string(p1) +
                             "): a plan is pending and names the rows as they are; apply it first (llama_arkv_apply_plan)");
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
        return false;
    }

    for (uint32_t ikv = 0; ikv < layers.size(); ++ikv) {
        layer & l = layers[ikv];
        const layer_move & m = moves[ikv];
        const layer old = l;
        plan_metadata(old, l, m);
        if (has_shift) { // the shifts owed follow their rows
            const std::vector<llama_pos> * s_old[3] = { &old.shift_lo, &old.shift_o, &old.shift_s };
            std::vector<llama_pos> * s_new[3] = { &l.shift_lo, &l.shift_o, &l.shift_s };
            for (int d = 0; d < 3; ++d) {
                std::fill(s_new[d]->begin(), s_new[d]->end(), 0);
                for (size_t i = 0; i < (size_t) m.n[d]*H; ++i) {
                    (*s_new[d])[i] = (*s_old[m.from[d][i]])[(size_t) m.src[d][i]*H + i%H];
                }
            }
        }
    }
    if (pending_rm.empty()) {
        pending_rm = std::move(moves);
    } else {
        // the rows of the new layout, where they lie now: through the removal still pending
        for (uint32_t ikv = 0; ikv < layers.size(); ++ikv) {
            const layer_move & prev = pending_rm[ikv];
            layer_move & m = moves[ikv];
            for (int d = 0; d < 3; ++d) {
                for (size_t i = 0; i < (size_t) m.n[d]*H; ++i) {
                    const size_t j = (size_t) m.src[d][i]*H + i%H;
                    const int f = m.from[d][i];
                    m.from[d][i] = prev.from[f][j];
                    m.src[d][i]  = prev.src[f][j];
                }
                m.n_old[d] = prev.n_old[d];
            }
        }
        pending_rm = std::move(moves);
    }
    pos_planned_max = pos_max; // rows moved: a later cut of the tail may not reach them
    if (pos_min_slow() < 0) {
        clear(false); // nothing left: as an empty cache (rows past the counts are never read)
    }
    return true;
}

// after the rows moved: the score accumulators of the kept rows follow them, the freed ones are zeroed
void llama_kv_cache_arkv::move_scores(const layer & l, const layer_move & m) const {
    const size_t H = n_head_kv_;
    ggml_tensor * acc[3] = { l.acc_lo, l.acc_o, l.acc_s };
    for (int plane = 0; plane < 2; ++plane) {
        std::vector<float> old[3];
        for (int d = 0; d < 3; ++d) {
            old[d].resize(m.n_old[d]*H);
            if (!old[d].empty()) {
                ggml_backend_tensor_get(acc[d], old[d].data(), plane*acc[d]->nb[2], old[d].size()*sizeof(float));
            }
        }
        for (int d = 0; d < 3; ++d) {
            std::vector<float> cur((size_t) std::max(m.n[d], m.n_old[d])*H, 0.0f);
            for (size_t i = 0; i < (size_t) m.n[d]*H; ++i) {
                cur[i] = old[m.from[d][i]][(size_t) m.src[d][i]*H + i%H];
            }
            if (!cur.empty()) {
                ggml_backend_tensor_set(acc[d], cur.data(), plane*acc[d]->nb[2], cur.size()*sizeof(float));
            }
        }
    }
}

// a layer's scores of one pool and plane [n][n_head_kv] for the rows the metadata shows: while a removal is
// pending, gathered from where the rows (and their accumulators) still lie
void llama_kv_cache_arkv::read_scores(const layer & l, uint32_t ikv, int pool, int plane, float * out) const {
    const size_t H = n_head_kv_;
    ggml_tensor * acc[3] = { l.acc_lo, l.acc_o, l.acc_s };
    const uint32_t n[3] = { l.n_lo, l.n_o, l.n_s };
    if (n[pool] == 0) {
        return;
    }
    if (pending_rm.empty()) {
        ggml_backend_tensor_get(acc[pool], out, plane*acc[pool]->nb[2], n[pool]*H*sizeof(float));
        return;
    }
    const layer_move & m = pending_rm[ikv];
    GGML_ASSERT(m.n[pool] == n[pool]);
    std::vector<float> old[3];
    for (int d = 0; d < 3; ++d) {
        old[d].resize(m.n_old[d]*H);
        if (!old[d].empty()) {
            ggml_backend_tensor_get(acc[d], old[d].data(), plane*acc[d]->nb[2], old[d].size()*sizeof(float));
        }
    }
    for (size_t i = 0; i < (size_t) n[pool]*H; ++i) {
        out[i] = old[m.from[pool][i]][(size_t) m.src[pool][i]*H + i%H];
    }
}

// move the rows of the pending removal, in the pools as they are placed (a removal changes no layout)
bool llama_kv_cache_arkv::apply_removal(llama_context * lctx) {
    const uint32_t H = n_head_kv_;
    std::vector<layer_move> moves = std::move(pending_rm);
    pending_rm.clear();

    const size_t n_nodes = PLAN_NODES_PER_LAYER*layers.size() + 16;
    ggml_init_params gp = { n_nodes*ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx_graph(ggml_init(gp));
    ggml_cgraph * gf = ggml_new_graph_custom(ctx_graph.get(), n_nodes, false);
    plan_inputs in { ctx_graph.get(), {}, {} };
    std::vector<bool> moved(moves.size(), false);
    for (size_t ikv = 0; ikv < moves.size(); ++ikv) {
        const auto & m = moves[ikv];
        moved[ikv] = !arkv_is_identity(m.n, m.n_old, m.src, m.from, H);
        if (moved[ikv]) {
            build_plan_moves(ctx_graph.get(), gf, in, layers[ikv], layers[ikv], m);
        }
    }

    switch (compute_update_graph(lctx, gf, in, "the removal of rows")) {
        case GRAPH_DONE: break;
        case GRAPH_NOT_ALLOCATED:
            clear(true); // the metadata shows the rows removed: it would lie
            llama_arkv_set_error("could not allocate the graph that removes rows (seq_rm): the cache was cleared");
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
            return false;
        case GRAPH_FAILED:
            return false; // cleared, error set
    }
    for (size_t ikv = 0; ikv < moves.size(); ++ikv) {
        if (moved[ikv]) {
            move_scores(layers[ikv], moves[ikv]);
            clear_tails(layers[ikv]);
        }
    }
    pools_generation++; // no graph built before may be reused: the scheduler ran this one since
    return true;
}

//
// shift
//

// add delta to the position of every row at a position in [p0, p1), in every layer, pool and head; their K
// owes the rotation until the next update. Returns the rows shifted.
uint32_t llama_kv_cache_arkv::shift_rows(llama_pos p0, llama_pos p1, llama_pos delta) {
    const uint32_t H = n_head_kv_;
    uint32_t n_shifted = 0;
    llama_pos new_max = pos_max >= p0 && pos_max < p1 ? pos_max + delta : pos_max;
    if (!has_shift) {
        for (auto & l : layers) {
            l.shift_lo.assign(l.pos_lo.size(), 0);
            l.shift_o.assign(l.pos_o.size(), 0);
            l.shift_s.assign(l.pos_s.size(), 0);
        }
    }
    for (auto & l : layers) {
        std::vector<llama_pos> * pos[3]   = { &l.pos_lo, &l.pos_o, &l.pos_s };
        std::vector<llama_pos> * shift[3] = { &l.shift_lo, &l.shift_o, &l.shift_s };
        const uint32_t n[3] = { l.n_lo, l.n_o, l.n_s };
        for (int d = 0; d < 3; ++d) {
            for (size_t i = 0; i < (size_t) n[d]*H; ++i) {
                llama_pos & p = (*pos[d])[i];
                if (p >= p0 && p < p1) {
                    GGML_ASSERT(p + delta >= 0); // rows that would go below 0 were removed first
                    p += delta;
                    (*shift[d])[i] += delta;
                    n_shifted++;
                }
                new_max = std::max(new_max, p);
            }
        }
    }
    if (n_shifted > 0) {
        has_shift = true;
        pos_max = new_max;
        pos_planned_max = pos_max; // rows moved: a later cut of the tail may not reach them
    } else if (!has_shift) {
        for (auto & l : layers) {
            l.shift_lo.clear();
            l.shift_o.clear();
            l.shift_s.clear();
        }
    }
    return n_shifted;
}

// rotate each row's K by the shift it owes: one gather, rope and scatter per pool of each layer, the rope
// with per-row positions (the deltas) over the rows viewed as [head_dim, 1, n]
bool llama_kv_cache_arkv::apply_shift(llama_context * lctx) {
    const uint32_t H = n_head_kv_;
    const int64_t  D = head_dim_;
    const auto & cparams = lctx->get_cparams();

    const size_t n_nodes = ARKV_SHIFT_NODES_PER_LAYER*layers.size() + 16;
    ggml_init_params gp = { n_nodes*ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx_graph(ggml_init(gp));
    ggml_context * ctx = ctx_graph.get();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_nodes, false);
    plan_inputs in { ctx, {}, {} };

    // K is stored as H k (H the orthonormal, symmetric Walsh-Hadamard matrix: H H = I)
    ggml_tensor * rot = rot_k ? in.make_f32(rot_k_size(), hadamard(rot_k_size())) : nullptr;

    const int rope_type = hparams.rope_type;
    for (auto & l : layers) {
        if (rope_type == LLAMA_ROPE_TYPE_NONE || !hparams.has_rope(l.il)) {
            continue;
        }
        const float freq_base  = model.get_rope_freq_base(cparams, l.il);
        const float freq_scale = model.get_rope_freq_scale(cparams, l.il);
        ggml_tensor * factors  = model.get_rope_factors(cparams, l.il);

        const std::vector<llama_pos> * shift[3] = { &l.shift_lo, &l.shift_o, &l.shift_s };
        const uint32_t n[3] = { l.n_lo, l.n_o, l.n_s };
        for (int d = 0; d < 3; ++d) {
            std::vector<int64_t> rows;
            std::vector<int64_t> deltas;
            for (size_t i = 0; i < (size_t) n[d]*H && !shift[d]->empty(); ++i) {
                if ((*shift[d])[i] != 0) {
                    rows.push_back(i); // row i of the pool viewed as [D, cap*H]: (slot i/H, head i%H)
                    deltas.push_back((*shift[d])[i]);
                }
            }
            if (rows.empty()) {
                continue;
            }
            const int64_t n_rows = rows.size();
            ggml_tensor * pool = pool_of(l, d, false);
            ggml_tensor * pool_rows = ggml_reshape_2d(ctx, pool, D, ggml_nelements(pool)/D);
            ggml_tensor * idx_get = in.make(GGML_TYPE_I32, rows);
            ggml_tensor * idx_set = in.make(GGML_TYPE_I64, std::move(rows));
            ggml_tensor * pos     = in.make(GGML_TYPE_I32, std::move(deltas));

            ggml_tensor * k = ggml_get_rows(ctx, pool_rows, idx_get); // F32 [D, n_rows]
            if (rot) {
                k = llama_mul_mat_hadamard(ctx, k, rot);
            }
            k = ggml_reshape_3d(ctx, k, D, 1, n_rows);
            k = ggml_rope_ext(ctx, k, pos, factors, hparams.n_rot(l.il), rope_type, cparams.n_ctx_orig_yarn,
                              freq_base, freq_scale, cparams.yarn_ext_factor, cparams.yarn_attn_factor,
                              cparams.yarn_beta_fast, cparams.yarn_beta_slow);
            k = ggml_reshape_2d(ctx, k, D, n_rows);
            if (rot) {
                k = llama_mul_mat_hadamard(ctx, k, rot);
            }
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, pool_rows, k, idx_set));
        }
    }

    // owed no more, whatever happens next (a failed graph clears the cache)
    for (auto & l : layers) {
        l.shift_lo.clear();
        l.shift_o.clear();
        l.shift_s.clear();
    }
    has_shift = false;

    switch (compute_update_graph(lctx, gf, in, "the K shift")) {
        case GRAPH_DONE: break;
        case GRAPH_NOT_ALLOCATED:
            clear(true); // the metadata shows the positions shifted: it would lie
            llama_arkv_set_error("could not allocate the graph that shifts K (seq_add): the cache was cleared");
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_arkv_last_error());
            return false;
        case GRAPH_FAILED:
            return false; // cleared, error set
    }
    pools_generation++; // no graph built before may be reused: the scheduler ran this one since
    return true;
}
