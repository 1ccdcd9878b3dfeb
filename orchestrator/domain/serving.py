"""How fast a batched inference server runs one model on one GPU: the parameters of
the simulator's performance model (docs/SIMULATION.md), kept per GPU x model in the
catalog. Pure.

Contract: every parameter is a finite number (an int or a float, not a bool) and not
negative; the prefill rate and the decode floor, which every table must give, are
positive. A bad value is a ValueError naming it (the config loader adds the path; a
table without `decode_base_ms` is its "missing required field").
`source` says where the figures come from, so that a reader can check them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ServingPerf:
    # Prefill is compute-bound: time grows with the prompt tokens not found in cache,
    # and with the context each of them attends to (the cached prefix and the tokens
    # before it in the prompt): ms per 1,000 prompt tokens per 1,000 tokens of context.
    prefill_tokens_per_s: float
    # A decode step is memory-bound: the weights are read once for the whole batch,
    # and each sequence's KV cache once for itself.
    decode_base_ms: float  # a step of one short sequence: without it a step is free
    prefill_overhead_ms: float = 0.0
    prefill_per_1k_context_ms: float = 0.0
    decode_per_seq_ms: float = 0.0  # each further sequence in the batch
    decode_per_1k_context_ms: float = 0.0  # each 1,000 tokens of context in the batch
    source: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "source":
                if not isinstance(self.source, str):
                    raise ValueError(f"source must be text, got {self.source!r}")
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")  # noqa: TRY004 - the contract: ValueError
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int beyond any float
                finite = False
            if not (finite and value >= 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value}")
        for name in ("prefill_tokens_per_s", "decode_base_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def for_device(table: Mapping[str, T], device_name: str) -> T | None:
    """A catalog table's entry for a device: its exact name, else the longest catalog
    name it starts with ("NVIDIA A100" for "NVIDIA A100-SXM4-80GB"), else "default".
    Must agree with `tokens_per_sec` in sandbox_worker/lua/builtins/common.lua."""
    if device_name in table:
        return table[device_name]
    prefixes = [n for n in table if n != "default" and device_name.startswith(n)]
    if prefixes:
        return table[max(prefixes, key=len)]
    return table.get("default")
