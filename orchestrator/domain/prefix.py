"""Prompt blocks, and what the workers are believed to hold of them (issue 16,
docs/ARCHITECTURE.md D29). Pure.

Contract:
- A prompt is cut into blocks of `block_tokens` tokens (512 by default, as in the
  Mooncake traces). Only full blocks count: a server's prefix cache holds only
  full blocks (vLLM's automatic prefix caching does the same).
- Block hashes are chained: the hash of block i covers blocks 0..i and a salt, so
  equal hashes mean equal prefixes. The salt is the tenant: two tenants' prompts
  never match, so a tenant's scheduler cannot probe what another tenant sent
  (vLLM's `cache_salt` exists for the same reason).
- A hash fits in `HASH_BITS` bits: the sandbox's LuaJIT numbers are doubles, exact
  up to 2**53. At a million distinct blocks, two colliding has odds of about 1e-4,
  and a collision only makes the approximate index a little more wrong.
- Before a prompt is tokenized, its tokens are its UTF-8 bytes / 4 (the estimate
  `domain/jobs.py` uses), so a block of text is `block_tokens * 4` bytes.
- `PrefixState` is the index as one context carries it: for each (worker, tenant),
  the frozen set of block hashes the worker is believed to hold. An unchanged entry
  is the same object from one context to the next, so a delta costs what changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

BLOCK_TOKENS = 512
# At 128 tokens a block, a full queue (1 GiB of prompts by default) holds 2 million
# hashes: about 100 MB in a sandbox. Smaller blocks would multiply that.
MIN_BLOCK_TOKENS, MAX_BLOCK_TOKENS = 128, 65_536
BYTES_PER_TOKEN = 4  # before tokenizing (domain/jobs.py, prompt_tokens)
HASH_BITS = 52
MAX_PROMPT_BLOCKS = 4096  # a job's blocks, whatever its prompt: 2M tokens at 512
# KV bytes per token when the catalog does not say: Llama-3.1-8B in fp16 (32 layers,
# 8 KV heads of 128 dimensions, K and V of 2 bytes each).
DEFAULT_KV_BYTES_PER_TOKEN = 131_072
MAX_WORKER_BLOCKS = 65_536  # what the index keeps for one worker, whatever its VRAM
MAX_SESSIONS = 65_536  # sessions whose last worker the index remembers, by default

NO_TENANT = ""


def chain(parts: Iterable[bytes], salt: str) -> tuple[int, ...]:
    """The chained hashes of blocks given as their contents (or ids, as bytes)."""
    digest = hashlib.blake2b(salt.encode(), digest_size=8, person=b"prefix-salt").digest()
    out = []
    for part in parts:
        digest = hashlib.blake2b(digest + part, digest_size=8).digest()
        out.append(int.from_bytes(digest, "big") >> (64 - HASH_BITS))
        if len(out) >= MAX_PROMPT_BLOCKS:
            break
    return tuple(out)


def text_blocks(text: str, salt: str, block_tokens: int = BLOCK_TOKENS) -> tuple[int, ...]:
    """The hashes of a prompt's full blocks."""
    data = text.encode()
    size = block_tokens * BYTES_PER_TOKEN
    full = min(len(data) // size, MAX_PROMPT_BLOCKS)
    return chain((data[i * size : (i + 1) * size] for i in range(full)), salt)


def id_blocks(ids: Sequence[int], salt: str) -> tuple[int, ...]:
    """The hashes of blocks a trace names by id (Mooncake's `hash_ids`: equal ids at
    equal positions are equal content)."""
    return chain((i.to_bytes(8, "big", signed=True) for i in ids), salt)


def matched_blocks(held: Container[int], hashes: Sequence[int]) -> int:
    """How many leading blocks of a prompt are held. A server reuses a prefix only up
    to its first missing block, so the count stops there."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


def capacity_blocks(tokens: int, block_tokens: int) -> int:
    return max(0, min(MAX_WORKER_BLOCKS, tokens // block_tokens))


@dataclass(frozen=True)
class PrefixState:
    """The prefix index in a context: per (worker id, tenant id or ""), the hashes held."""

    block_tokens: int = BLOCK_TOKENS
    held: Mapping[tuple[str, str], frozenset[int]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def holding(self, worker_id: str) -> frozenset[int]:
        """Every block the worker holds, whoever's."""
        sets = [h for (w, _), h in self.held.items() if w == worker_id]
        return sets[0] if len(sets) == 1 else frozenset().union(*sets)

    def for_tenant(self, tenant_id: str) -> PrefixState:
        """Only the blocks of one tenant's prompts."""
        mine = {key: h for key, h in self.held.items() if key[1] == tenant_id}
        return PrefixState(self.block_tokens, MappingProxyType(mine))


EMPTY = PrefixState()
