"""Pools on other hosts joining and reporting (PoolService): registration, heartbeats,
and the commands handed back with each heartbeat reply."""

from __future__ import annotations

import asyncio
from typing import Protocol

from orchestrator.domain.errors import InvalidRequestError, NotFoundError
from orchestrator.state.remote_pools import Heartbeat, RemoteCommand, RemotePool
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger

log = get_logger("service")


class Remotes(Protocol):
    """orchestrator/state/remote_pools.py, RemotePools."""

    def get(self, pool_id: str) -> RemotePool | None: ...
    def status(self, pool: RemotePool, at_ms: int) -> str: ...
    def register(self, pool_id: str, endpoint: str, at_ms: int) -> None: ...
    def heartbeat(self, pool: RemotePool, beat: Heartbeat, at_ms: int) -> list[RemoteCommand]: ...


class PoolRegistry:
    def __init__(self, remote: Remotes, *, local_pool_id: str | None, wake: asyncio.Event) -> None:
        self.remote = remote
        self.local_pool_id = local_pool_id  # the core's own pool: not for registration
        self.wake = wake

    def register(self, pool_id: str, endpoint: str) -> None:
        if pool_id == self.local_pool_id:
            raise InvalidRequestError("pool_id", f"{pool_id!r} is the orchestrator's own pool")
        self.remote.register(pool_id, endpoint, now_ms())
        log.info("pool.registered", pool=pool_id, endpoint=endpoint)
        self.wake.set()

    def heartbeat(self, beat: Heartbeat) -> list[RemoteCommand]:
        """Record a heartbeat; returns the commands waiting for this pool."""
        pool = self.remote.get(beat.pool_id)
        if pool is None:
            raise NotFoundError(f"pool {beat.pool_id!r} is not registered; call Register first")
        at = now_ms()
        if self.remote.status(pool, at) == "offline":
            log.info("pool.back_online", pool=beat.pool_id)
        commands = self.remote.heartbeat(pool, beat, at)
        self.wake.set()
        return commands
