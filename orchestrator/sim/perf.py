"""How long a simulated inference server takes: prefills and decode steps, from the
catalog's performance model of a GPU x model (domain/serving.py, docs/SIMULATION.md). Pure.

Contract (times in ms, token counts as given):
- A prefill of `tokens` new prompt tokens after `cached` ones found in the prefix cache:
  prefill_overhead_ms + tokens * 1000 / prefill_tokens_per_s
  + prefill_per_1k_context_ms * tokens/1000 * (cached + tokens/2)/1000
  (compute for each token, then attention over the context it sees: on average the
  cached prefix and half the new tokens).
- A decode step of `batch` sequences whose contexts total `context` tokens:
  decode_base_ms + decode_per_seq_ms * (batch - 1) + decode_per_1k_context_ms * context/1000
  (the weights read once for the batch, compute per sequence, each sequence's KV read).
- Each step adds `batch` tokens to the context, so `steps` steps take the integral of the
  step time over them, `decode_ms`; `decode_steps` inverts it. Steps are continuous
  (a worker's progress between two events is a fraction of a step as often as not).
- A GPU shared by k busy workers runs each of them k times slower: callers multiply.
- `fallback` is the model for a catalog entry with no performance table.
"""

from __future__ import annotations

import math

from orchestrator.domain.serving import ServingPerf

# A catalog model without a performance table runs at its estimated_tokens_per_sec, in
# the proportions of the calibrated Llama-3-8B Q4_K_M on an A100 (docs/SIMULATION.md):
# its prompt rate 6,126 tokens/s against a 7.32 ms step, a further sequence 0.163 ms,
# 1,000 tokens of context 0.318 ms in a step and 19.2 ms per 1,000 prompt tokens.
PREFILL_SPEEDUP = 6126.4 * 7.3238 / 1000  # prompt tokens/s per generated token/s: 44.9
PER_SEQ_SHARE = 0.1632 / 7.3238
PER_1K_CONTEXT_SHARE = 0.3181 / 7.3238
PREFILL_CONTEXT_SHARE = 19.162 / 7.3238
DEFAULT_TOKENS_PER_S = 10.0  # a model the catalog gives no rate at all


def prefill_ms(perf: ServingPerf, tokens: int, cached: int = 0) -> float:
    if tokens <= 0:
        return perf.prefill_overhead_ms
    context = (cached + tokens / 2) / 1000
    return (
        perf.prefill_overhead_ms
        + tokens * 1000 / perf.prefill_tokens_per_s
        + perf.prefill_per_1k_context_ms * tokens / 1000 * context
    )


def step_ms(perf: ServingPerf, batch: int, context: float) -> float:
    return (
        perf.decode_base_ms
        + perf.decode_per_seq_ms * max(0, batch - 1)
        + perf.decode_per_1k_context_ms * context / 1000
    )


def decode_ms(perf: ServingPerf, batch: int, context: float, steps: float) -> float:
    """How long `steps` steps take from a total context of `context` tokens."""
    growth = perf.decode_per_1k_context_ms / 1000 * batch  # step time added by one step
    return steps * step_ms(perf, batch, context) + growth * steps * steps / 2


def decode_steps(perf: ServingPerf, batch: int, context: float, ms: float) -> float:
    """How many steps fit in `ms` from a total context of `context` tokens."""
    if ms <= 0:
        return 0.0
    first = step_ms(perf, batch, context)
    growth = perf.decode_per_1k_context_ms / 1000 * batch
    if first <= 0:
        return math.inf
    # growth/2 k^2 + first k - ms = 0, in the form that stays exact when growth is 0.
    return 2 * ms / (first + math.sqrt(first * first + 2 * growth * ms))


def fallback(tokens_per_s: float) -> ServingPerf:
    """The performance of a model the catalog gives only a single-stream rate."""
    base = 1000 / (tokens_per_s if tokens_per_s > 0 else DEFAULT_TOKENS_PER_S)
    return ServingPerf(
        prefill_tokens_per_s=1000 / base * PREFILL_SPEEDUP,
        prefill_per_1k_context_ms=base * PREFILL_CONTEXT_SHARE,
        decode_base_ms=base,
        decode_per_seq_ms=base * PER_SEQ_SHARE,
        decode_per_1k_context_ms=base * PER_1K_CONTEXT_SHARE,
        source="derived from estimated_tokens_per_sec (sim/perf.py, fallback)",
    )
