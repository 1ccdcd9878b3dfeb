"""The workers that run one scheduler: one active, the rest warm spares.

Runs in the core. Spares are spawned, loaded and kept in sync with the context in
the background, so that replacing a killed or crashed worker is a promotion, never
a spawn on the hot path. Respawning happens in background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from pathlib import Path
from typing import Protocol

import grpc
from grpc import aio
from prometheus_client import Counter

from orchestrator.domain.errors import SandboxUnavailableError, SchedulerLoadError
from orchestrator.sandbox.process import SchedulerSpec, WorkerProcess
from orchestrator.state.journal import SnapshotJournal
from orchestrator.support.log import get_logger

log = get_logger("sandbox")

SPAWN_RETRY_S = 1.0
LOAD_TIMEOUT_RETRIES = 2  # load timeouts in a row before the script is deemed to loop
# Socket names must be unique in the runtime directory across groups: a replaced
# user scheduler's group still runs while its successor starts.
_labels = itertools.count(1)
# A replacement is spawned this long after a worker is retired, not at once: the
# fork and the new interpreter's start-up would compete with the fallback call
# that is serving the same cycle.
RESPAWN_DELAY_S = 0.2
SYNC_TIMEOUT_S = 10.0


class GroupMetrics(Protocol):
    """What a group counts: spawns, promotions, retirements (labels: scheduler, event)."""

    @property
    def worker_events(self) -> Counter: ...


class WorkerGroup:
    def __init__(
        self,
        role: str,
        spec: SchedulerSpec,
        runtime_dir: Path,
        *,
        spares: int,
        metrics: GroupMetrics,
    ) -> None:
        self.role = role  # "user" or "platform": the label on metrics and logs
        self.spec = spec
        self.runtime_dir = runtime_dir
        self.target_spares = spares
        self.metrics = metrics
        self.active: WorkerProcess | None = None
        self.spares: deque[WorkerProcess] = deque()
        self.load_error: SchedulerLoadError | None = None
        self._spawning: set[asyncio.Task[None]] = set()
        self._load_timeouts = 0
        self._spare_ready = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bring up the active worker and the spares; raises SchedulerLoadError for a bad script."""
        results = await asyncio.gather(
            *(self._spawn() for _ in range(1 + self.target_spares)), return_exceptions=True
        )
        workers = [r for r in results if isinstance(r, WorkerProcess)]
        errors = [r for r in results if isinstance(r, BaseException)]
        # A load that timed out while another worker loaded fine was the worker's fault.
        load_errors = [
            e for e in errors
            if isinstance(e, SchedulerLoadError) and not (e.transient and workers)
        ]  # fmt: skip
        if load_errors:
            self.load_error = load_errors[0]
            for worker in workers:
                worker.kill()
            raise self.load_error
        if not workers:
            raise errors[0]
        self.active = workers[0]
        self.spares.extend(workers[1:])
        if errors:
            self._replenish()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        for worker in self.workers():
            worker.kill()
        self.active = None
        self.spares.clear()
        await asyncio.sleep(0)

    def workers(self) -> list[WorkerProcess]:
        return ([self.active] if self.active else []) + list(self.spares)

    async def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess(self.spec, self.runtime_dir, f"{self.role[0]}{next(_labels)}")
        started = time.perf_counter()
        await worker.start()
        self.metrics.worker_events.labels(self.role, "spawned").inc()
        log.debug(
            "sandbox.worker_started",
            scheduler=self.role,
            worker=worker.label,
            pid=worker.pid,
            spawn_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return worker

    # ------------------------------------------------------------------ serving
    async def acquire(self, timeout_s: float) -> WorkerProcess:
        """The worker to serve this cycle: the active one, else a promoted spare.

        Only when no spare is warm (everything died at once) does this wait for a
        spawn, bounded by `timeout_s`.
        """
        if self.load_error is not None:
            raise self.load_error
        if self.active is not None and self.active.alive:
            return self.active
        if self.active is not None:
            self.retire(self.active, "exited")
        deadline = time.monotonic() + timeout_s
        while True:
            while self.spares:
                spare = self.spares.popleft()
                if not spare.alive:
                    self.retire(spare, "exited")
                    continue
                self.active = spare
                self.metrics.worker_events.labels(self.role, "promoted").inc()
                await self._settle(spare, deadline)
                return spare
            self._replenish()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.load_error is not None:
                raise self.load_error or SandboxUnavailableError(
                    f"no {self.role} sandbox worker is available"
                )
            self._spare_ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._spare_ready.wait()

    @staticmethod
    async def _settle(spare: WorkerProcess, deadline: float) -> None:
        """Let a background sync to the spare finish (bounded), so the call that follows
        does not race it. Whatever it did not bring, the Schedule call sends."""
        task = spare.sync_task
        if task is None or task.done():
            return
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(task)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # we are being cancelled ourselves: never swallow that

    def retire(self, worker: WorkerProcess, event: str) -> None:
        """Kill a worker (timeout, crash, violation...) and start its replacement."""
        worker.kill()
        self.metrics.worker_events.labels(self.role, event).inc()
        if worker is self.active:
            self.active = None
        elif worker in self.spares:
            self.spares.remove(worker)
        asyncio.get_running_loop().call_later(RESPAWN_DELAY_S, self._replenish)

    def _replenish(self) -> None:
        if self._closed or self.load_error is not None:
            return
        have = (1 if self.active and self.active.alive else 0) + len(self.spares)
        for _ in range(1 + self.target_spares - have - len(self._spawning)):
            task = asyncio.get_running_loop().create_task(self._spawn_spare())
            self._spawning.add(task)
            task.add_done_callback(self._spawning.discard)

    async def _spawn_spare(self) -> None:
        try:
            worker = await self._spawn()
        except SchedulerLoadError as exc:
            if exc.transient and self._load_timeouts < LOAD_TIMEOUT_RETRIES:
                self._load_timeouts += 1
                log.warning("sandbox.load_timeout_retry", scheduler=self.role, error=str(exc),
                            attempt=self._load_timeouts)  # fmt: skip
                self._respawn()
                return
            self.load_error = exc
            self._spare_ready.set()
            return
        except SandboxUnavailableError as exc:
            self.metrics.worker_events.labels(self.role, "spawn_failed").inc()
            log.error("sandbox.spawn_failed", scheduler=self.role, error=str(exc))
            await asyncio.sleep(SPAWN_RETRY_S)
            self._respawn()
            return
        self._load_timeouts = 0
        if self._closed:
            worker.kill()
            return
        self.spares.append(worker)
        self._spare_ready.set()

    def _respawn(self) -> None:
        """From a failed spawn: replace it now. This task no longer counts as spawning;
        its done callback would run too late, after a _replenish that saw it still there."""
        task = asyncio.current_task()
        if task is not None:
            self._spawning.discard(task)
        self._replenish()

    # ------------------------------------------------------------------ spares
    def sync_spares(self, journal: SnapshotJournal) -> None:
        """Push the latest context to idle spares in the background."""
        for spare in self.spares:
            busy = spare.sync_task is not None and not spare.sync_task.done()
            if busy or (spare.epoch == journal.epoch and spare.seq == journal.seq):
                continue
            request = journal.request_for(spare.epoch, spare.seq)
            request.sync_only = True
            spare.sync_task = asyncio.get_running_loop().create_task(self._sync(spare, request))

    async def _sync(self, spare: WorkerProcess, request: object) -> None:
        try:
            reply = await spare.schedule(request, SYNC_TIMEOUT_S)  # type: ignore[arg-type]
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                spare.epoch = 0  # the next sync sends a full snapshot
            else:
                self.retire(spare, "crashed")
            return
        if reply.retire:
            self.retire(spare, "retired")
