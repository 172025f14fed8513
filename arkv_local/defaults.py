"""The knobs' defaults, in one place: Llama, MemoryParams and the policies read them here.

(llama_arkv_default_params in the C API mirrors the memory's; a test keeps them equal.)
"""

from __future__ import annotations

WINDOW = 32       # newest tokens always kept in f16, never scored
SINKS = 4         # first tokens always kept in f16: StreamingLLM's attention sinks
SLACK = 64        # O slots a tailoring frees for new tokens, so that it does not run per token
QUANT = "q4_0"    # type of the 4-bit (Q) state
ROTATE = True     # Walsh-Hadamard rotation of cached K/V, as llama.cpp's quantized caches
OBSERVE = 32      # last queries of each ubatch whose attention is scored (ARKV's window)
N_O_INIT = 0      # O slots per layer at creation; 0: the whole budget in f16
ATTN = "auto"     # decode attention path (memory.ATTN_PATHS)
SPILL = "host"    # where rows leaving the budget go (host memory), recalled by each prompt's tail


def slack_for(budget_tokens: int) -> int:
    """kv_slack's default for a budget of budget_tokens f16 tokens per layer: SLACK, or 1/64 of
    the budget when that is larger (a plan's cost grows with the rows it ranks, so decoding then
    spends about the same share of its time on plans at any budget), or 1/4 of it when that is
    smaller (room left free after each plan is budget that keeps no past token: at 128 tokens a
    slack of 64 with the window and sinks left 28 for the rest of the text)."""
    return max(min(SLACK, budget_tokens // 4), budget_tokens // 64, 1)
