// Tri-state KV memory (ARKV): every cached token, per layer and per KV head, is Original (f16),
// Quantized (a 4-bit or 8-bit ggml block type) or Evicted.
//
// Per layer, K and V each own one byte arena of the layer's budget. The arena holds the O pool (f16)
// followed by the LO pool (low precision: the rows in the paper's Q state; "q" stays llama.cpp's query),
// both token-major: one row of head_dim values per (slot, KV head), [head_dim * n_head_kv, cap], placed as
// typed views of the arena. The O/LO split of an arena can change when a plan is applied. A slot may hold
// different tokens in different heads; all heads of a layer hold equal counts. Outside the budget, a
// layer may keep a third pool in host memory (or a memory-mapped file): S, the spilled rows, in type_q.
// They are read only by recall passes (llama_arkv_set_recall), and plans bring them back into O or LO.
//
// Files: this header and llama-kv-cache-arkv.cpp (llama_memory_i: pools, metadata, seq_*, state),
// llama-arkv-plan.cpp (plans: validate, move rows, commit), llama-arkv-shift.cpp (seq_rm of a middle
// range and seq_add: rows removed from every pool, positions shifted, K re-roped), llama-arkv-graph.cpp
// (the attention input, the store, choose_attn_path and the attention paths, scores, statistics),
// llama-arkv-attn-cpu.* (the fused CPU attention kernel) and llama-arkv.* (the C API). New tokens are appended to O; which tokens move
// O->LO or get evicted is decided outside (a plan from Python).

#pragma once

#include "llama-arkv.h"
#include "llama-arkv-attn-cpu.h"
#include "llama-graph.h"
#include "llama-memory.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <string>
#include <vector>

struct llama_model;
struct llama_cparams;
struct llama_hparams;
class llama_kv_cache_arkv_context;

class llama_kv_cache_arkv : public llama_memory_i {
public:
    // per layer: pools (views into the arenas), host metadata and score accumulators
    struct layer {
        uint32_t il;        // layer index in the model

        ggml_tensor * k_arena; // I8 [arena_alloc_bytes()]
        ggml_tensor * v_arena;
        ggml_backend_dev_t dev_fused = nullptr; // the arenas' device when it runs the fused attention ops

        uint32_t cap_o  = 0; // slots in the O pool
        uint32_t cap_lo = 0; // slots in the LO pool
        uint32_t n_o    = 0; // slots in use (equal in all heads)
        uint32_t n_lo   = 0;

        ggml_tensor * k_o  = nullptr; // F16    [n_embd_gqa, cap_o], a view at k_arena + 0
        ggml_tensor * v_o  = nullptr;
        ggml_tensor * k_lo = nullptr; // type_q [n_embd_gqa, cap_lo], a view after the O pool
        ggml_tensor * v_lo = nullptr;

        // host: position of the token in (slot, head), -1 when free; [cap][n_head_kv]
        std::vector<llama_pos> pos_o;
        std::vector<llama_pos> pos_lo;

        // device: attention mass and squared mass per (slot, head) since the last plan
        ggml_tensor * acc_o  = nullptr; // F32 [n_head_kv, cap_o_max, 2]
        ggml_tensor * acc_lo = nullptr; // F32 [n_head_kv, cap_lo_max, 2]

        // device: entropy, variance and kurtosis of the observation window's attention (ARKV)
        ggml_tensor * stats = nullptr; // F32 [3]

        // host: the spilled pool (fixed placement, cap_s may be 0), its positions and score accumulator
        uint32_t cap_s = 0;
        uint32_t n_s   = 0;
        ggml_tensor * k_s = nullptr; // type_q [n_embd_gqa, cap_s]
        ggml_tensor * v_s = nullptr;
        std::vector<llama_pos> pos_s;
        ggml_tensor * acc_s = nullptr; // F32 [n_head_kv, cap_s, 2]

        // host: the RoPE shift each row's K still owes (seq_add), applied by the next update; shaped as
        // the positions while a shift is pending, else empty
        std::vector<llama_pos> shift_o;
        std::vector<llama_pos> shift_lo;
        std::vector<llama_pos> shift_s;
    };

    llama_kv_cache_arkv(const llama_model & model, const llama_cparams & cparams,
                        const llama_arkv_params & params);
    ~llama_kv_cache_arkv() override;

    // why a model cannot be served (empty if it can)
    static std::string unsupported_reason(const llama_model & model, const llama_cparams & cparams);

    //
    // llama_memory_i
    //

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override { return true; }

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id) override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    //
    // arkv API (behind the C API in llama-arkv.h)
    //

    uint32_t n_layer()   const { return layers.size(); }
    uint32_t n_head_kv() const { return n_head_kv_; }
    uint32_t head_dim()  const { return head_dim_; }
    const layer & get_layer(uint32_t i) const { return layers[i]; }

    // slots one token costs in a pool, and what a layout with cap_o O slots leaves for Q
    size_t   row_bytes_o() const;
    size_t   row_bytes_lo() const; // also a spilled row's
    uint32_t cap_lo_for(uint32_t cap_o) const;
    size_t   arena_alloc_bytes() const;

    // where layer i's K pools lie in its arena (see llama_arkv_get_pool_extent)
    void pool_extent(uint32_t i, uint64_t out[6]) const;

    llama_arkv_layer_info layer_info(uint32_t i) const;

    // validate and queue a plan; it is applied by the next memory update (before the next decode)
    // returns an empty string on success, else what is wrong (nothing is changed then)
    std::string submit_plan(const llama_arkv_layer_plan * plans);
    // whether an update is pending (rows seq_rm removed, a seq_add's shift, a plan), applied by the next
    // llama.cpp memory update (init_update: before a decode, or llama_arkv_apply_plan) in that order
    bool has_update() const { return !pending.empty() || !pending_rm.empty() || has_shift; }

    // statistics of the next decode's last ubatch (see llama-arkv.h)
    void request_stats();
    bool get_stats(float * out) const; // [n_layer][3]

    // copy the score accumulators [cap][n_head_kv] per pool into host buffers (see llama-arkv.h)
    void get_scores(float * sum_o, float * sum_sq_o, float * sum_q, float * sum_sq_q, float * sum_s, float * sum_sq_s) const;

    // the next ubatches also attend over the spilled rows (see llama_arkv_set_recall)
    void set_recall(bool on);
    // the next ubatches read a prompt (see llama_arkv_set_prompt)
    void set_prompt(bool on) { prompt = on; }
    uint32_t get_n_scored() const { return n_scored; }

    //
    // graph_build API (used by llama_kv_cache_arkv_context and the graph hooks)
    //

    // the rows each layer attends over for a ubatch, and where its window sits in the shared mask
    struct view {
        uint32_t n_lo     = 0; // LO rows in use (LO only changes with plans)
        uint32_t n_lo_pad = 0; // LO rows read by a flash attention over LO alone (padded for ggml-cuda's vector kernel)
        uint32_t n_s      = 0; // spilled rows read (recall passes only)
        uint32_t n_o      = 0; // O rows in use after the ubatch is stored
        uint32_t n_o_pad  = 0; // O rows read (padded, for graph reuse)
        uint32_t n_tail   = 0; // the dequant path's hidden rows after them: it reads a multiple of ARKV_DEQ_ALIGN rows
        uint32_t start    = 0; // first mask column of this layer
    };
    struct layout {
        std::vector<view> views;  // [n_layer]
        uint32_t n_old      = 0;  // mask columns before the new tokens (X)
        uint32_t n_mask     = 0;  // mask width
        uint32_t n_lo_max   = 0;  // the LO rows' mask (segments path): n_lo_max visible columns, then lo_pad_max hidden
        uint32_t n_deq_max  = 0;  // the most rows a layer's dequant path reads (the row index input)
        uint32_t lo_pad_max = 0;
        bool stats = false;       // compute the observation window's statistics
        bool recall = false;      // a recall pass: spilled rows are read, and every query is scored
        bool prompt = false;      // a prompt's ubatch: llama.cpp's attention whatever its size
        uint32_t pools = 0;       // pool placement the graph reads (changes with plans and state loads)
        bool operator==(const layout & other) const;
    };

    layout make_layout(uint32_t n_tokens, bool worst_case) const;

    // the stored rows for the current ubatch
    void apply_ubatch(const llama_ubatch & ubatch);
    bool can_fit(uint32_t n_tokens) const;
    int32_t free_slots() const; // O slots free in every layer, once the pending plan is applied
    bool cut_tail(llama_pos p0); // as seq_rm(p0, -1), a tailored tail too

    bool rotate_k() const { return rot_k; }
    bool rotate_v() const { return rot_v; }
    // size of the K rotation's blocks: the largest power of two >= 64 that divides head_dim, as llama.cpp's
    int64_t rot_k_size() const;

    ggml_tensor * build_input_rot(ggml_context * ctx, int64_t n) const;

    // how one layer attends for one ubatch (choose_attn_path)
    enum attn_path {
        ATTN_STOCK,     // only O rows: llama.cpp's attention over them
        ATTN_DEQUANT,   // LO rows dequantized to f16 and concatenated with O: llama.cpp's attention
        ATTN_FUSED,     // one pass over LO, S and O rows in host memory, or LO and O rows on a device that
                        // implements it (llama-arkv-attn-cpu.h)
        ATTN_SEGMENTS,  // flash attention over LO rows as they lie and over O rows, merged exactly
    };
    attn_path choose_attn_path(const llm_graph_context & gctx, const layer & l, const view & v, int64_t n_tokens,
                               const layout & lay) const;

    // store K/V of the current ubatch into O and accumulate scores for the last n_score_queries
    // queries; returns the attention output when it computed it (fused or segments), else nullptr
    // and the f16 K/V for llama.cpp's attention, [head_dim, n_head_kv, n_kv]
    ggml_tensor * build_kv(llm_graph_context & gctx, class llm_graph_input_attn_kv_arkv * inp,
                           ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur, float kq_scale, int il,
                           ggml_tensor ** k_out, ggml_tensor ** v_out) const;

    void build_store(ggml_context * ctx0, ggml_cgraph * gf, const class llm_graph_input_attn_kv_arkv * inp, const layer & l,
                     uint32_t ikv, ggml_tensor * k_cur, ggml_tensor * v_cur, ggml_tensor ** k_o, ggml_tensor ** v_o) const;
    ggml_tensor * pool_heads(ggml_context * ctx0, ggml_tensor * pool, int64_t n) const;
    ggml_tensor * build_read_dequant(ggml_context * ctx0, const class llm_graph_input_attn_kv_arkv * inp, const view & v,
                                     ggml_tensor * pool_o, ggml_tensor * pool_lo, ggml_tensor * pool_s) const;
    ggml_tensor * build_read_vt(ggml_context * ctx0, const view & v, ggml_tensor * pool_o, ggml_tensor * pool_lo,
                                ggml_tensor * pool_s) const;
    ggml_tensor * build_probs(ggml_context * ctx0, ggml_tensor * q_cur, ggml_tensor * k_lo, ggml_tensor * k_o,
                              ggml_tensor * mask, float kq_scale, int64_t n_sel) const;
    void build_scores(ggml_context * ctx0, ggml_cgraph * gf, const layer & l, const view & v, ggml_tensor * p) const;
    ggml_tensor * build_attn_segments(ggml_context * ctx0, ggml_cgraph * gf, const class llm_graph_input_attn_kv_arkv * inp,
                                      const layer & l, const view & v, ggml_tensor * q_cur, ggml_tensor * k_o,
                                      ggml_tensor * v_o, ggml_tensor * mask, float kq_scale, int64_t n_sel) const;
    void build_stats(ggml_context * ctx0, ggml_cgraph * gf, const layer & l, ggml_tensor * p, int64_t n_nw) const;

    // host inputs
    void set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const;
    void set_input_kq_mask(ggml_tensor * dst, const llama_ubatch * ubatch, const layout & lay) const;
    void set_input_q_mask(ggml_tensor * dst, const layout & lay) const;
    void set_input_rot(ggml_tensor * dst) const;
    static std::vector<float> hadamard(int64_t n); // orthonormal Sylvester Walsh-Hadamard matrix [n, n]

private:
    friend class llama_kv_cache_arkv_context;

    // a validated plan for one layer: per new pool, the old slot and pool (llama_arkv_pool) of each new row
    struct layer_move {
        uint32_t ikv;   // index in layers
        uint32_t cap_o; // new layout
        uint32_t n[3] = {}; // new rows per pool, indexed by llama_arkv_pool (Q = LO)
        std::vector<int32_t> src[3];  // [n][n_head_kv]
        std::vector<uint8_t> from[3]; // [n][n_head_kv]
        uint32_t n_old[3] = {}; // rows per pool where the rows lie now (moves of removed rows only)
    };

    static constexpr size_t PLAN_NODES_PER_LAYER = 192; // per arena up to 9 moves of 7 nodes (reshape, gather, index view, staging set_rows, view, reshape, scatter), plus inputs

    // inputs of a graph that moves or re-ropes rows, set once the graph is allocated
    struct plan_inputs {
        ggml_context * ctx;
        std::vector<std::pair<ggml_tensor *, std::vector<int64_t>>> idxs; // converted to the tensor's type when set
        std::vector<std::pair<ggml_tensor *, std::vector<float>>> f32s;
        // nodes to run beside the buffer they read or write (see place()); the scheduler's own choice follows node
        // order, and may copy whole pools between host and device
        std::vector<std::pair<ggml_tensor *, ggml_backend_buffer_t>> placed;

        // I32 or I64 [data.size()]; nullptr if empty
        ggml_tensor * make(ggml_type type, std::vector<int64_t> data);
        // F32 [ne0, data.size()/ne0]
        ggml_tensor * make_f32(int64_t ne0, std::vector<float> data);
        void set() const;
        // the node runs on the first backend (in the scheduler's order: devices before the CPU) that can use the
        // buffer of t: an op over the spill in host memory on the CPU, one over a device's pools on that device
        ggml_tensor * place(ggml_tensor * node, const ggml_tensor * t);
        void place_all(ggml_backend_sched_t sched) const;
    };

    const llama_model & model;
    const llama_hparams & hparams;
    const llama_arkv_params params;

    uint32_t n_head_kv_ = 0;
    uint32_t head_dim_  = 0;
    size_t   arena_bytes = 0; // per layer, for K and for V each

    bool rot_k = false;
    bool rot_v = false;

    std::vector<layer> layers;
    std::vector<int32_t> map_layer_ids; // model layer -> index in layers, -1 if none

    // the pool tensors (metadata only, placed into the arena buffers) and the arenas/accumulators
    ggml_context_ptr ctx_pools;
    std::vector<ggml_context_ptr> ctx_retired; // pool metadata of earlier layouts, until the next update
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;

    llama_pos pos_max = -1;        // last position stored
    llama_pos pos_planned_max = -1; // last position that was in the cache when a plan was applied
    uint32_t n_scored = 0;         // queries accumulated since the last plan
    uint32_t pools_generation = 0; // bumped whenever the pools are placed anew
    bool want_stats  = false;      // the next batch's last ubatch computes statistics
    bool recall      = false;      // ubatches also attend over the spilled rows
    bool prompt      = false;      // ubatches read a prompt: never the fused decode kernel
    bool stats_valid = false;

    std::vector<layer_move> pending;

    // rows removed by seq_rm (or by a seq_add below position 0): the host metadata (positions, counts) already
    // shows the pools without them, the rows themselves still lie where they were. Per layer, each row in use
    // and where it lies now (identity moves where the layer lost nothing); applied before the shift and the plan.
    std::vector<layer_move> pending_rm;
    bool has_shift = false; // some row's K owes a RoPE shift (layer::shift_*)

    // the spilled pools: their buffer, and the file mapping behind it (kv_spill="disk")
    ggml_context_ptr ctx_spill;
    ggml_backend_buffer_ptr buf_spill;
    void * spill_map = nullptr;
    size_t spill_map_bytes = 0;

    void alloc_layers(const llama_cparams & cparams, uint32_t cap_o_max);
    void alloc_spill(const llama_cparams & cparams);
    // kv_spill="disk": the pages of [p, p + n) (all of the spill file when null) leave the process's resident memory
    void release_spill_pages(const void * p = nullptr, size_t n = 0) const;

    // what a build_release_spill op releases: one layer's spilled rows (the op's userdata)
    struct spill_release {
        const llama_kv_cache_arkv * kv;
        uint32_t ikv;
    };
    std::vector<spill_release> spill_releases; // [n_layer]
    static void release_spill_op(ggml_tensor * dst, int ith, int nth, void * userdata);
    // a graph node after `after` that releases layer ikv's spilled rows (a recall pass read them): one layer's
    // pages of the spill file resident at a time
    ggml_tensor * build_release_spill(ggml_context * ctx0, ggml_tensor * after, uint32_t ikv) const;
    ggml_tensor * pool_of(const layer & l, int pool, bool v) const;
    void place_pools(ggml_context * ctx, layer & l, uint32_t cap_o);
    void state_write_layer(llama_io_write_i & io, const layer & l) const;
    void state_read_layer(llama_io_read_i & io, ggml_context * ctx, layer & l);
    void clear_tails(const layer & l);
    bool apply_plan(llama_context * lctx);
    bool apply_update(llama_context * lctx);

    // seq_rm of a middle range and seq_add (llama-arkv-shift.cpp)
    std::string removal_move(const layer & l, uint32_t ikv, llama_pos p0, llama_pos p1, layer_move & m) const;
    bool remove_rows(llama_pos p0, llama_pos p1);
    uint32_t shift_rows(llama_pos p0, llama_pos p1, llama_pos delta);
    bool apply_removal(llama_context * lctx);
    bool apply_shift(llama_context * lctx);
    enum graph_status { GRAPH_DONE, GRAPH_NOT_ALLOCATED, GRAPH_FAILED };
    graph_status compute_update_graph(llama_context * lctx, ggml_cgraph * gf, const plan_inputs & in, const char * what);
    void move_scores(const layer & l, const layer_move & m) const;
    void read_scores(const layer & l, uint32_t ikv, int pool, int plane, float * out) const;
    void build_plan_moves(ggml_context * ctx, ggml_cgraph * gf, plan_inputs & in, const layer & lo, const layer & ln,
                          const layer_move & m) const;
    void plan_metadata(const layer & lo, layer & ln, const layer_move & m) const;
    void reset_scores();

    llama_pos pos_min_slow() const;
};

// the first backend of the scheduler (devices before the CPU) that can use buf: where an op over it needs no copy
ggml_backend_t llama_arkv_backend_for(ggml_backend_sched_t sched, ggml_backend_buffer_t buf);

// the attention input when the memory is ours: idxs of new rows, the shared mask, rotations
class llm_graph_input_attn_kv_arkv : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_kv_arkv(const llama_hparams & hparams, const llama_cparams & cparams,
                                 const llama_kv_cache_arkv_context * mctx_arkv) :
        llm_graph_input_attn_kv(hparams, cparams, nullptr), mctx_arkv(mctx_arkv) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    ggml_tensor * lo_arange = nullptr; // I32 [n_deq_max]: 0, 1, ... (the dequant path's gathers and placements)
    ggml_tensor * lo_mask   = nullptr; // F16 [n_lo_max + lo_pad_max, n_tokens]: the LO rows' mask (segments path)

    // what the layers read of the inputs above (self_k_idxs, self_kq_mask, lo_arange, lo_mask): one copy of each
    // per graph, placed beside the pools (llama_kv_cache_arkv::build_kv). A view of an input itself is a separate
    // input of its split, copied from the host layer by layer: a mask window per layer, n_tokens x n_mask each
    struct {
        ggml_tensor * k_idxs = nullptr, * kq_mask = nullptr, * lo_arange = nullptr, * lo_mask = nullptr;
    } near;

    llama_kv_cache_arkv::layout lay; // what the graph was built for

    const llama_kv_cache_arkv_context * mctx_arkv;
};

class llama_kv_cache_arkv_context : public llama_memory_context_i {
public:
    // error / no update
    explicit llama_kv_cache_arkv_context(llama_memory_status status);
    // full: worst-case graph for reservation
    explicit llama_kv_cache_arkv_context(llama_kv_cache_arkv * kv);
    // update: apply what is pending (apply_update)
    llama_kv_cache_arkv_context(llama_kv_cache_arkv * kv, llama_context * lctx);
    // batch
    llama_kv_cache_arkv_context(llama_kv_cache_arkv * kv, std::vector<llama_ubatch> ubatches);

    bool next() override;
    bool apply() override;
    const llama_ubatch & get_ubatch() const override;
    llama_memory_status get_status() const override { return status; }

    llama_kv_cache_arkv * get_kv() const { return kv; }
    const llama_kv_cache_arkv::layout & get_layout() const { return lay; }

private:
    llama_memory_status status;
    llama_kv_cache_arkv * kv = nullptr;
    llama_context * lctx = nullptr;
    bool is_full = false;

    size_t i_cur = 0;
    std::vector<llama_ubatch> ubatches;
    llama_kv_cache_arkv::layout lay;
};

// graph hooks, called from llama-graph.cpp (see patches/); build_attn_kv returns the attention
// output when it computed it, else nullptr and k/v for the stock build_attn_mha
llm_graph_input_attn_kv * llama_arkv_build_attn_inp(const llm_graph_context & gctx);
ggml_tensor * llama_arkv_build_attn_kv(const llm_graph_context & gctx, llm_graph_input_attn_kv * inp,
                                       ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                       float kq_scale, int il, ggml_tensor ** k, ggml_tensor ** v);

// context hook: graph nodes the memory adds to the model's graph (0 if it is not ARKV)
uint32_t llama_arkv_graph_extra_nodes(const llama_memory_i * mem);

// context hook, called from llama_context::memory_update: whether mem is the tri-state memory (its pools, and
// so its worst-case graph, change with updates)
bool llama_arkv_is_memory(const llama_memory_i * mem);

// model hook, called from llama_model::create_memory: nullptr when ARKV is not armed
llama_memory_i * llama_arkv_create_memory(const llama_model & model, const llama_cparams & cparams);

// the parameters armed by llama_arkv_arm(), taken once (llama-arkv.cpp)
bool llama_arkv_take_armed(llama_arkv_params * out);
void llama_arkv_set_error(const std::string & msg);
