"""The workers that run one scheduler: one active, the rest warm spares.

Runs in the core. Spares are spawned, loaded and kept in sync with the journal in
the background (a new spare as soon as it is up, the others after each cycle), so
that replacing a killed or crashed worker is a promotion that costs at most the
latest deltas: never a spawn, nor a full snapshot, on the hot path. Respawning
happens in background tasks.
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
    """What a group counts: spawns, promotions, retirements (labels: scheduler, event),
    and full snapshots sent in the background (labels: scheduler, when)."""

    @property
    def worker_events(self) -> Counter: ...

    @property
    def resyncs(self) -> Counter: ...


class WorkerGroup:
    def __init__(
        self,
        role: str,
        spec: SchedulerSpec,
        runtime_dir: Path,
        *,
        spares: int,
        metrics: GroupMetrics,
        journal: SnapshotJournal,
        spare_lag: int = 1,
    ) -> None:
        self.role = role  # "user" or "platform": the label on metrics and logs
        self.spec = spec
        self.runtime_dir = runtime_dir
        self.target_spares = spares
        self.metrics = metrics
        self.journal = journal  # what background syncs bring workers up to
        self.spare_lag = spare_lag  # spares are synced once this many cycles behind
        self.active: WorkerProcess | None = None
        self.spares: deque[WorkerProcess] = deque()
        self.load_error: SchedulerLoadError | None = None
        self._spawning: set[asyncio.Task[None]] = set()
        self._syncing: set[asyncio.Task[None]] = set()
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
        for task in (*self._spawning, *self._syncing):
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

        A call still in flight on it (a background sync, a discarded hedge) is let
        finish first, within `timeout_s`, so that the call that follows does not race
        it; whatever it did not bring, that call sends. Only when no spare is warm
        (everything died at once) does this wait for a spawn, bounded by `timeout_s`.
        """
        if self.load_error is not None:
            raise self.load_error
        active = self.active
        if active is not None and active.alive:
            if active.busy:
                await active.settle(timeout_s)
            return active
        if active is not None:
            self.retire(active, "exited")
        deadline = time.monotonic() + timeout_s
        while True:
            while self.spares:
                spare = self.spares.popleft()
                if not spare.alive:
                    self.retire(spare, "exited")
                    continue
                self.active = spare
                self.metrics.worker_events.labels(self.role, "promoted").inc()
                await spare.settle(deadline - time.monotonic())
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
        # Now, not after the next cycle: a crash before then would find it empty.
        self._sync_later(worker)

    def _respawn(self) -> None:
        """From a failed spawn: replace it now. This task no longer counts as spawning;
        its done callback would run too late, after a _replenish that saw it still there."""
        task = asyncio.current_task()
        if task is not None:
            self._spawning.discard(task)
        self._replenish()

    # ------------------------------------------------------------------ syncing
    def sync(self, *, active: bool = False) -> None:
        """Bring workers up to the journal's current cycle in the background: the spares
        once they are `spare_lag` cycles behind, and with `active` the active worker
        too. After a cycle: that cycle's deltas."""
        if active and self.active is not None:
            self._sync_later(self.active)
        for spare in self.spares:
            if self._due(spare):
                self._sync_later(spare)

    def _due(self, spare: WorkerProcess) -> bool:
        journal = self.journal
        return spare.epoch != journal.epoch or journal.seq - spare.seq >= self.spare_lag

    def _needs_sync(self, worker: WorkerProcess) -> bool:
        """Behind the journal, and free: a call in flight brings it up to date itself,
        or leaves it to the next sync."""
        journal = self.journal
        behind = (worker.epoch, worker.seq) != (journal.epoch, journal.seq)
        return behind and journal.seq > 0 and not worker.busy and not worker.killed

    def _sync_later(self, worker: WorkerProcess) -> None:
        if self._needs_sync(worker):
            task = asyncio.get_running_loop().create_task(self._sync(worker))
            self._syncing.add(task)
            task.add_done_callback(self._syncing.discard)

    async def _sync(self, worker: WorkerProcess) -> None:
        # Checked and built when the task runs, not when it was created: a call made in
        # between (the next cycle's) has moved the worker on, or is still in flight.
        if not self._needs_sync(worker):
            return
        request = self.journal.request_for(worker.epoch, worker.seq)
        request.sync_only = True
        if request.HasField("snapshot"):
            self.metrics.resyncs.labels(self.role, "background").inc()
        try:
            reply = await worker.schedule(request, SYNC_TIMEOUT_S)
        except aio.AioRpcError as exc:
            if worker.killed:
                return  # retired meanwhile, and counted then
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                worker.epoch = 0  # the next sync sends a full snapshot
            else:
                self.retire(worker, "crashed")
            return
        if reply.retire:
            self.retire(worker, "retired")
        elif worker in self.spares and self._due(worker):
            # Cycles that ended meanwhile skipped it (busy): catch up now, not after the
            # next cycle. Not once promoted: the cycle that promoted it calls it next.
            self._sync_later(worker)
