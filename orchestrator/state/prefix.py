"""The core's approximate index of the prompt blocks each worker holds, and of the
worker each session last ran on (issue 16, docs/ARCHITECTURE.md D29). Pure.

What a worker holds is not asked of it: the index records the blocks of every
prompt the core sent it, least recently used first, and drops the oldest beyond the
worker's KV capacity (`domain/prefix_queries.py`, `kv_capacity_tokens`). A real
server evicts by its own rules, so the index can be wrong both ways; a worker that
reports its cache (vLLM's KV events, llama-server's slots) would call `replace` with
what it holds, and the rest stays as it is.

Each tenant's blocks on a worker are an LRU of their own, bounded by the worker's
whole capacity: one order shared by all tenants would let a tenant's scheduler watch
its own blocks being pushed out and learn when, and how much, another tenant sent
(a real server's shared cache does leak that way; the index need not). The index
over-estimates instead, which costs a worse guess, not a leak. Sessions are kept per
tenant for the same reason: one tenant's sessions never push out another's.

A prompt's blocks are recorded last block first, so that its first block, which
later prompts are likeliest to share, is the last to go: servers evict a prefix's
tail before its head for the same reason.

`state()` is what a context carries: per (worker, tenant) a frozen set, rebuilt only
for the entries that changed since the last call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence
from types import MappingProxyType

from orchestrator.domain.prefix import (
    BLOCK_TOKENS,
    MAX_SESSIONS,
    MAX_WORKER_BLOCKS,
    NO_TENANT,
    PrefixState,
    matched_blocks,
)

Key = tuple[str, str]  # (worker id, tenant id or "")


class PrefixIndex:
    def __init__(self, block_tokens: int = BLOCK_TOKENS, max_sessions: int = MAX_SESSIONS) -> None:
        self.block_tokens = block_tokens
        self.max_sessions = max_sessions  # per tenant
        self._held: dict[Key, OrderedDict[int, None]] = {}  # oldest first
        self._sessions: dict[str, OrderedDict[str, str]] = {}  # tenant -> session -> worker
        self._frozen: dict[Key, frozenset[int]] = {}
        self._dirty: set[Key] = set()
        self._state = PrefixState(block_tokens)

    # ------------------------------------------------------------------ blocks
    def record(
        self, worker_id: str, tenant_id: str | None, hashes: Sequence[int], capacity: int
    ) -> None:
        """A prompt of these blocks was sent to the worker, which has room for
        `capacity` blocks."""
        key = (worker_id, tenant_id or NO_TENANT)
        held = self._held.setdefault(key, OrderedDict())
        for h in reversed(hashes):
            held[h] = None
            held.move_to_end(h)
        limit = min(capacity, MAX_WORKER_BLOCKS)
        while len(held) > limit:
            held.popitem(last=False)
        if not held:
            del self._held[key]
        self._dirty.add(key)

    def discard(self, worker_id: str, tenant_id: str | None, hashes: Sequence[int]) -> None:
        """The worker never processed this prompt (its attempt failed before the first
        token): its blocks are not there for that reason. Blocks another prompt left
        go too; the index is a guess, and a failing worker is a poor one to favour."""
        key = (worker_id, tenant_id or NO_TENANT)
        held = self._held.get(key)
        if held is None:
            return
        for h in hashes:
            held.pop(h, None)
        if not held:
            del self._held[key]
        self._dirty.add(key)

    def replace(self, worker_id: str, held: Iterable[tuple[int, str]]) -> None:
        """What the worker reports it holds, oldest first, as (hash, tenant) pairs."""
        self._drop_worker(worker_id)
        for h, tenant in held:
            table = self._held.setdefault((worker_id, tenant), OrderedDict())
            table[h] = None
            if len(table) > MAX_WORKER_BLOCKS:
                table.popitem(last=False)
            self._dirty.add((worker_id, tenant))

    def forget(self, worker_id: str) -> None:
        """The worker stopped: its cache is gone, and its sessions go elsewhere."""
        self._drop_worker(worker_id)
        for sessions in self._sessions.values():
            for session in [s for s, w in sessions.items() if w == worker_id]:
                del sessions[session]

    def retain(self, worker_ids: Container[str]) -> None:
        """Forget every worker not among these (they stopped without being evicted)."""
        gone = {w for w, _ in self._held} | {
            w for sessions in self._sessions.values() for w in sessions.values()
        }
        for worker_id in gone:
            if worker_id not in worker_ids:
                self.forget(worker_id)

    def _drop_worker(self, worker_id: str) -> None:
        for key in [k for k in self._held if k[0] == worker_id]:
            del self._held[key]
            self._dirty.add(key)

    def matched(self, worker_id: str, tenant_id: str | None, hashes: Sequence[int]) -> int:
        held = self._held.get((worker_id, tenant_id or NO_TENANT))
        return matched_blocks(held.keys(), hashes) if held else 0

    def blocks(self, worker_id: str) -> int:
        return sum(len(h) for (w, _), h in self._held.items() if w == worker_id)

    def state(self) -> PrefixState:
        if not self._dirty:
            return self._state
        for key in self._dirty:
            held = self._held.get(key)
            if held:
                self._frozen[key] = frozenset(held)
            else:
                self._frozen.pop(key, None)
        self._dirty.clear()
        self._state = PrefixState(self.block_tokens, MappingProxyType(dict(self._frozen)))
        return self._state

    # ------------------------------------------------------------------ sessions
    def route(self, tenant_id: str | None, session_id: str | None, worker_id: str) -> None:
        """A job of the session was dispatched to the worker."""
        if not session_id:
            return
        sessions = self._sessions.setdefault(tenant_id or NO_TENANT, OrderedDict())
        sessions[session_id] = worker_id
        sessions.move_to_end(session_id)
        while len(sessions) > self.max_sessions:
            sessions.popitem(last=False)

    def session_worker(self, tenant_id: str | None, session_id: str | None) -> str | None:
        if not session_id:
            return None
        sessions = self._sessions.get(tenant_id or NO_TENANT)
        return sessions.get(session_id) if sessions is not None else None
