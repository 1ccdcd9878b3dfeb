"""Pools on other hosts, as their heartbeats (PoolService) describe them.

A remote pool reports its GPUs, host and worker processes; the core hands it the
start_worker and evict_worker commands its scheduler decided, with the next
heartbeat reply. Between the two, the core shows what it asked for: workers it asked
to start appear as "starting", workers it asked to go are hidden. Without that, the
scheduler would ask again every cycle.

A worker's slots are the pool's to report (`slots_total`, and the `api` it speaks);
which jobs fill them is the core's, from what it dispatched, so a heartbeat's
`slots_busy` and `active_job_ids` are not read (api/rpc/pools.py leaves them out).

A worker id belongs to one pool: the pool that reported it first, or was asked to
start it, keeps it until it stops reporting it (`owner`), so that no other pool can
take over a worker's dispatches. A pool silent for `pools.expire_after_ms` is removed
(`expire`). What a heartbeat may contain is checked before it gets here
(`pool_checks.py`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from orchestrator.config.settings import PoolsConfig
from orchestrator.domain.context import Gpu, HostReading, ProcessInfo
from orchestrator.domain.decision import EvictWorker, StartWorker


@dataclass(frozen=True)
class Heartbeat:
    """What a remote pool reports about itself, every `pools.heartbeat_ms` (decoded
    from PoolService's request at the edge, api/rpc/pools.py)."""

    pool_id: str
    endpoint: str  # empty: unchanged
    gpus: tuple[Gpu, ...]
    workers: tuple[ProcessInfo, ...]
    cached_models: tuple[str, ...]
    host: HostReading


@dataclass(frozen=True)
class RemoteCommand:
    """An action for a remote pool, handed over with its next heartbeat reply."""

    id: str
    action: StartWorker | EvictWorker
    worker_id: str = ""  # for start_worker: the id the new worker must report
    vram_bytes: int = 0


@dataclass
class RemotePool:
    """A pool managed from another host, known through PoolService heartbeats."""

    id: str
    endpoint: str
    last_heartbeat_ms: int = 0
    gpus: tuple[Gpu, ...] = ()
    reported: tuple[ProcessInfo, ...] = ()
    cached_models: tuple[str, ...] = ()
    host: HostReading = HostReading()
    commands: deque[RemoteCommand] = field(default_factory=deque)
    # Workers asked for but not reported yet (shown as starting), and workers asked
    # to go (hidden): without these the scheduler would ask again every cycle.
    pending: dict[str, tuple[ProcessInfo, int]] = field(default_factory=dict)
    evicting: set[str] = field(default_factory=set)

    @property
    def workers(self) -> tuple[ProcessInfo, ...]:
        shown = tuple(w for w in self.reported if w.id not in self.evicting)
        return shown + tuple(info for info, _ in self.pending.values())

    @property
    def worker_ids(self) -> set[str]:
        """The workers this pool holds: reported, and asked for but not reported yet."""
        return {w.id for w in self.reported} | self.pending.keys()


class RemotePools:
    def __init__(self, config: PoolsConfig, *, startup_timeout_ms: int) -> None:
        self.config = config
        # A worker asked for and never reported is forgotten after this long.
        self.startup_timeout_ms = startup_timeout_ms
        self._pools: dict[str, RemotePool] = {}
        self._owners: dict[str, str] = {}  # worker id -> the pool that holds it
        self.version = 0  # bumped on every change; part of the cluster's version

    def get(self, pool_id: str) -> RemotePool | None:
        return self._pools.get(pool_id)

    def __contains__(self, pool_id: object) -> bool:
        return pool_id in self._pools

    def __len__(self) -> int:
        return len(self._pools)

    def owner(self, worker_id: str) -> str | None:
        """The pool that holds `worker_id`, if any does."""
        return self._owners.get(worker_id)

    def sorted(self) -> list[RemotePool]:
        return sorted(self._pools.values(), key=lambda p: p.id)

    def processes(self) -> Iterator[tuple[str, ProcessInfo]]:
        """Every remote worker process, with its pool id."""
        for pool in self._pools.values():
            for process in pool.workers:
                yield pool.id, process

    def status(self, pool: RemotePool, at_ms: int) -> str:
        age = at_ms - pool.last_heartbeat_ms
        if age > self.config.offline_after_ms:
            return "offline"
        if age > self.config.degraded_after_ms:
            return "degraded"
        return "healthy"

    def register(self, pool_id: str, endpoint: str, at_ms: int) -> None:
        pool = self._pools.get(pool_id)
        if pool is None:
            self._pools[pool_id] = RemotePool(pool_id, endpoint, at_ms)
        else:
            pool.endpoint, pool.last_heartbeat_ms = endpoint, at_ms
        self.version += 1

    def heartbeat(self, pool: RemotePool, beat: Heartbeat, at_ms: int) -> list[RemoteCommand]:
        """Take in a heartbeat; returns (and forgets) the commands waiting for the pool."""
        held = pool.worker_ids
        pool.last_heartbeat_ms = at_ms
        if beat.endpoint:
            pool.endpoint = beat.endpoint
        pool.gpus, pool.reported = beat.gpus, beat.workers
        pool.cached_models, pool.host = beat.cached_models, beat.host
        reported = {w.id for w in beat.workers}
        pool.evicting &= reported
        pool.pending = {
            wid: (info, asked)
            for wid, (info, asked) in pool.pending.items()
            if wid not in reported and at_ms - asked < self.startup_timeout_ms
        }
        self._reindex(pool, held)
        commands = list(pool.commands)
        pool.commands.clear()
        self.version += 1
        return commands

    def expire(self, at_ms: int) -> list[RemotePool]:
        """Remove the pools silent for longer than `expire_after_ms`; returns them."""
        limit = self.config.expire_after_ms
        gone = [p for p in self._pools.values() if at_ms - p.last_heartbeat_ms > limit]
        for pool in gone:
            del self._pools[pool.id]
            self._reindex(pool, pool.worker_ids, held_now=set())
        if gone:
            self.version += 1
        return gone

    def _reindex(
        self, pool: RemotePool, held_before: set[str], *, held_now: set[str] | None = None
    ) -> None:
        """Worker ownership after `pool` went from holding `held_before` to what it holds."""
        now = pool.worker_ids if held_now is None else held_now
        for worker_id in held_before - now:
            if self._owners.get(worker_id) == pool.id:
                del self._owners[worker_id]
        for worker_id in now - held_before:
            self._owners.setdefault(worker_id, pool.id)  # the first holder keeps it

    def start(self, pool_id: str, command: RemoteCommand, at_ms: int) -> None:
        pool = self._pools[pool_id]
        action = command.action
        assert isinstance(action, StartWorker)
        info = ProcessInfo(
            command.worker_id,
            action.model_ref,
            (action.gpu_id,),
            command.vram_bytes,
            "",
            "starting",
            at_ms,
        )
        pool.pending[command.worker_id] = (info, at_ms)
        self._owners.setdefault(command.worker_id, pool_id)
        pool.commands.append(command)
        self.version += 1

    def evict(self, worker_id: str, command: RemoteCommand) -> bool:
        """Queue the eviction for the pool that reported the worker; False if none did."""
        for pool in self._pools.values():
            if any(w.id == worker_id for w in pool.reported):
                pool.evicting.add(worker_id)
                pool.commands.append(command)
                self.version += 1
                return True
        return False
