// C API of arkv_local's additions to libllama: the tri-state (ARKV) KV memory.
//
// Arm the module, then create a context: its KV memory is ARKV instead of llama.cpp's cache.
// Slots are per layer; arrays that cover all layers are laid out layer after layer, and within
// a layer pool as [slot][kv head].
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // Identifies a libllama built by arkv_local: "arkv_local <version> (llama.cpp <build>)".
    LLAMA_API const char * llama_arkv_version(void);

    // how a small ubatch (decoding, <= 8 tokens) attends over a layer with Q rows; larger ubatches
    // always dequantize Q rows into f16 and run llama.cpp's attention (prefill is compute-bound)
    enum llama_arkv_attn {
        LLAMA_ARKV_ATTN_AUTO     = 0, // the fused kernel: host pools, or a device that runs it (CUDA); else SEGMENTS
        LLAMA_ARKV_ATTN_DEQUANT  = 1, // Q rows dequantized to f16, concatenated with O, stock attention
        LLAMA_ARKV_ATTN_SEGMENTS = 2, // flash attention over Q rows as they lie and over O rows, merged exactly
    };

    struct llama_arkv_params {
        uint64_t       budget_bytes;    // K+V bytes each layer may hold (O rows in f16, Q rows in type_q)
        uint32_t       n_o_init;        // O slots per layer at creation; 0: the whole budget in f16
        enum ggml_type type_q;          // Q pool type: GGML_TYPE_Q4_0 (default), Q4_1 or Q8_0
        bool           rotate;          // Walsh-Hadamard rotation of K and V (both pools), as llama.cpp's quantized caches
        uint32_t       n_score_queries; // last queries of each ubatch whose attention is accumulated (0: none)
        enum llama_arkv_attn attn;      // decode attention path (LLAMA_ARKV_ATTN_AUTO)
        uint32_t       cap_s;           // spilled (S) slots per layer, type_q rows in host memory; 0: no spill
        const char *   spill_dir;       // S pool in a memory-mapped file in this directory (NULL: in RAM)
    };

    // where a row of a plan comes from
    enum llama_arkv_pool {
        LLAMA_ARKV_POOL_Q = 0, // the Q pool (type_q): moved as is
        LLAMA_ARKV_POOL_O = 1, // the O pool (f16): quantized now when it goes to Q or S
        LLAMA_ARKV_POOL_S = 2, // the spilled pool (type_q, host memory): moved as is, or dequantized into O
    };

    struct llama_arkv_layer_info {
        uint32_t cap_o;       // O slots (f16)
        uint32_t cap_q;       // Q slots (type_q)
        uint32_t n_o;         // O slots in use, in every KV head
        uint32_t n_q;         // Q slots in use
        uint64_t bytes_alloc; // K+V bytes the layer's pools own
        uint64_t bytes_used;  // K+V bytes of the rows in use
        uint32_t cap_s;       // spilled slots (host memory, outside the budget)
        uint32_t n_s;         // spilled slots in use
        uint64_t bytes_spill; // K+V bytes of the spilled rows in use
    };

    // one layer's next layout: which current rows each new slot takes, per KV head; a row no new slot
    // takes is evicted. Rows that stay where they are (same pool and bytes) are not moved.
    struct llama_arkv_layer_plan {
        uint32_t        cap_o;  // O slots of the new layout (the rest of the layer's budget is Q)
        uint32_t        n_o;    // O slots kept
        uint32_t        n_q;    // Q slots after the plan
        uint32_t        n_s;    // spilled slots after the plan (<= cap_s)
        const int32_t * o_src;  // [n_o][n_head_kv]: current slot of each new O slot ...
        const uint8_t * o_from; // [n_o][n_head_kv]: ... in this pool (enum llama_arkv_pool; NULL: all in O)
        const int32_t * q_src;  // [n_q][n_head_kv]: current slot of each new Q slot ...
        const uint8_t * q_from; // [n_q][n_head_kv]: ... in this pool
        const int32_t * s_src;  // [n_s][n_head_kv]: current slot of each new S slot ...
        const uint8_t * s_from; // [n_s][n_head_kv]: ... in this pool
    };

    LLAMA_API struct llama_arkv_params llama_arkv_default_params(void);

    // the next context created by this thread uses ARKV with these parameters (NULL disarms); taken by one context
    LLAMA_API void llama_arkv_arm(const struct llama_arkv_params * params);

    // why the last ARKV call failed (also a refused model), or ""
    LLAMA_API const char * llama_arkv_last_error(void);
    // set it to "": before a llama.cpp call that may fail in ARKV's part or before it (llama_state_set_data)
    LLAMA_API void llama_arkv_clear_error(void);

    // the context's ARKV shape; -1 when its memory is not ARKV
    LLAMA_API int32_t llama_arkv_n_layer  (const struct llama_context * ctx);
    LLAMA_API int32_t llama_arkv_n_head_kv(const struct llama_context * ctx);
    LLAMA_API int32_t llama_arkv_head_dim (const struct llama_context * ctx);

    // bytes of one slot (K+V, all KV heads) in the O and in the Q pool
    LLAMA_API uint64_t llama_arkv_slot_bytes(const struct llama_context * ctx, bool quantized);

    // bytes of the context's compute buffers, all backends: what its graphs reserved (any memory)
    LLAMA_API uint64_t llama_arkv_compute_bytes(const struct llama_context * ctx);

    // Q slots a layer's budget leaves when its O pool has cap_o slots (0 if cap_o does not fit)
    LLAMA_API uint32_t llama_arkv_cap_q(const struct llama_context * ctx, uint32_t cap_o);

    // tokens that can be decoded before a plan must free O slots (once the pending plan, if any, is applied)
    LLAMA_API int32_t llama_arkv_free_slots(const struct llama_context * ctx);

    // positions from p0 on leave the cache, as llama_memory_seq_rm(mem, 0, p0, -1), also where plans moved
    // rows (seq_rm refuses that tail: the prefix left is not what a fresh read holds). False, nothing changed
    // (llama_arkv_last_error says why), where a layer's KV heads would keep different numbers of rows or a plan
    // is pending
    LLAMA_API bool llama_arkv_cut_tail(struct llama_context * ctx, int32_t p0);

    // where layer i's K pools lie in its arena, in bytes (V's are alike): out[6] = { O offset, O bytes,
    // Q offset, Q bytes, arena bytes allocated, 1 if all pools are views of their arena (never padded) }
    LLAMA_API bool llama_arkv_get_pool_extent(const struct llama_context * ctx, int32_t i, uint64_t * out);

    LLAMA_API void llama_arkv_get_layers(const struct llama_context * ctx, struct llama_arkv_layer_info * out);

    // positions per slot (-1: free); pos_o holds cap_o*n_head_kv values per layer, pos_q cap_q*n_head_kv,
    // pos_s cap_s*n_head_kv
    LLAMA_API void llama_arkv_get_positions(const struct llama_context * ctx, int32_t * pos_o, int32_t * pos_q,
                                            int32_t * pos_s);

    // attention mass and squared mass per slot since the last plan, laid out as positions (spilled rows
    // only gain mass in recall passes); returns the number of queries accumulated (each summed over its
    // GQA group of query heads)
    LLAMA_API uint32_t llama_arkv_get_scores(const struct llama_context * ctx,
                                             float * sum_o, float * sum_sq_o, float * sum_q, float * sum_sq_q,
                                             float * sum_s, float * sum_sq_s);

    // apply what is pending now instead of before the next decode (so that a state saved next holds
    // it): rows removed by llama_memory_seq_rm (a middle range or a prefix) or by a llama_memory_seq_add
    // below position 0, the K rotation a seq_add owes to the rows it shifted (their positions already
    // changed), then the plan. 0 on success, 1 if nothing is pending, -1 if it failed
    // (llama_arkv_last_error says why). A state cannot be saved while a seq_rm or seq_add is pending.
    LLAMA_API int32_t llama_arkv_apply_plan(struct llama_context * ctx);

    // while on, every ubatch attends over the spilled rows too (and scores them): a recall pass, run
    // on the last tokens of a prompt so that the plan after it can bring back what the question needs
    LLAMA_API void llama_arkv_set_recall(struct llama_context * ctx, bool on);

    // while on, every ubatch is read with llama.cpp's attention, small ones too (not the fused decode
    // kernel): the logits a prompt ends with do not depend on how much of it the cache already held
    LLAMA_API void llama_arkv_set_prompt(struct llama_context * ctx, bool on);

    // the next decode's last ubatch measures, per layer, the entropy, variance and kurtosis of the
    // attention of its last n_score_queries queries (ARKV's observation window) to the keys before them
    LLAMA_API void llama_arkv_request_stats(struct llama_context * ctx);

    // per layer [entropy, variance, kurtosis] into out[n_layer*3]; false if not measured since the request
    LLAMA_API bool llama_arkv_get_stats(const struct llama_context * ctx, float * out);

    // validate a plan (one entry per layer) and apply it before the next decode; 0 on success,
    // -1 if it is refused (llama_arkv_last_error says why; nothing changes)
    LLAMA_API int32_t llama_arkv_submit_plan(struct llama_context * ctx, const struct llama_arkv_layer_plan * plans);

#ifdef __cplusplus
}
#endif
