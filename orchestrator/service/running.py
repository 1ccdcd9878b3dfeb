"""Running dispatched jobs: one task per job, streaming it from its worker.

A job's task ends in one transition: completed, retried or failed (under `retry`),
or cancelled when a client asked. A job whose worker is known to be gone without an
answer (its pool expired) is abandoned: stopped, and retried like any lost worker's
job. When the service stops, running tasks are
cancelled without a transition: the store still says the job is in flight, and the
next start retries it (`Jobs.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from orchestrator.domain.jobs import JobRecord
from orchestrator.pools.completion import Outcome, Progress, WorkerEndpoint
from orchestrator.service.jobs import Jobs
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger
from orchestrator.support.tasks import cancel_and_wait

log = get_logger("service")


class Completions(Protocol):
    """Runs a job on a worker (orchestrator/pools/completion.py, CompletionClient)."""

    async def run(
        self, record: JobRecord, worker: WorkerEndpoint, timeout_s: float, progress: Progress
    ) -> Outcome: ...
    async def close(self) -> None: ...


class OutputFeed(Protocol):
    """Where a running job's text goes as it arrives (service/outputs.py, JobOutputs)."""

    def begin(self, job_id: str, attempt: int) -> None: ...
    def append(self, job_id: str, text: str, tokens: int) -> None: ...


class WorkerOccupancy(Protocol):
    """Which jobs each worker runs (orchestrator/state/cluster.py, ClusterState)."""

    def occupy(self, worker_id: str, job_id: str, at_ms: int) -> None: ...
    def release(self, worker_id: str, job_id: str, at_ms: int) -> None: ...


class FailedWorkers(Protocol):
    """Where a worker that stopped answering is reported (the local pool)."""

    def mark_failed(self, worker_id: str, detail: str) -> None: ...


class JobRunner:
    def __init__(
        self,
        jobs: Jobs,
        occupancy: WorkerOccupancy,
        completions: Completions,
        failed_workers: FailedWorkers | None,
        outputs: OutputFeed,
        *,
        timeout_s: float,
    ) -> None:
        self.jobs = jobs
        self.outputs = outputs
        self.occupancy = occupancy
        self.completions = completions
        self.failed_workers = failed_workers
        self.timeout_s = timeout_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._abandoned: dict[str, str] = {}  # job id -> why its worker is gone

    def __len__(self) -> int:
        return len(self._running)

    def start(self, record: JobRecord, worker_id: str, endpoint: WorkerEndpoint, at: int) -> None:
        """Run a job dispatched to `worker_id` (serving at `endpoint`) at `at`."""
        self.occupancy.occupy(worker_id, record.id, at)
        self.outputs.begin(record.id, record.attempts)
        self._running[record.id] = asyncio.get_running_loop().create_task(
            self._run(record, worker_id, endpoint)
        )

    async def cancel(self, job_id: str) -> None:
        """A client cancelled the job: stop it, and mark it cancelled."""
        task = self._running.get(job_id)
        if task is not None:
            self._cancel_requested.add(job_id)
            await cancel_and_wait(task)

    async def abandon(self, job_id: str, error: str) -> bool:
        """The job's worker is gone: stop waiting for it, and retry the job under
        `retry` with `error`. False when the job has no task left to stop (it is
        making its own transition)."""
        task = self._running.get(job_id)
        if task is None:
            return False
        self._abandoned[job_id] = error
        await cancel_and_wait(task)
        return True

    async def drain(self, timeout_s: float) -> None:
        """Let running jobs finish for up to `timeout_s`, then stop the rest."""
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=timeout_s)
        await self.stop()

    async def stop(self) -> None:
        """Stop every running job; each stays in flight in the store, retried on restart."""
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop what still runs, and close the connections to the workers."""
        await self.stop()
        await self.completions.close()

    async def _run(self, record: JobRecord, worker_id: str, endpoint: WorkerEndpoint) -> None:
        job_id = record.id
        progress = _JobProgress(job_id, self.jobs, self.outputs)
        try:
            outcome = await self.completions.run(record, endpoint, self.timeout_s, progress)
        except asyncio.CancelledError:
            progress.write_first_token()
            await self._stopped(record, worker_id)
            with contextlib.suppress(Exception):  # the task ends cancelled, as it was
                await progress.recorded()
            raise
        except Exception as exc:
            # Left uncaught, the job would stay in flight holding its slot, with no task
            # to cancel or abandon: it fails this attempt like any broken worker.
            log.exception("job.client_failed", job=job_id, worker=worker_id)
            outcome = Outcome(False, error=f"worker failed: {type(exc).__name__}")
        finally:
            self._running.pop(job_id, None)
        at = now_ms()
        self.occupancy.release(worker_id, job_id, at)
        if outcome.ok:
            await self.jobs.complete(
                job_id, worker_id, outcome.output, outcome.tokens, at,
                prompt_tokens=outcome.prompt_tokens, finish_reason=outcome.finish_reason,
                first_token_at=progress.first_token_at(),
            )  # fmt: skip
        else:
            progress.write_first_token()
            if outcome.worker_failed and self.failed_workers is not None:
                self.failed_workers.mark_failed(worker_id, outcome.error)
            await self.jobs.retry_or_fail(record, outcome.error, at)
        await progress.recorded()

    async def _stopped(self, record: JobRecord, worker_id: str) -> None:
        job_id = record.id
        at = now_ms()
        self.occupancy.release(worker_id, job_id, at)
        lost = self._abandoned.pop(job_id, None)
        if job_id in self._cancel_requested:
            self._cancel_requested.discard(job_id)
            await self.jobs.cancel_in_flight(job_id, at)
        elif lost is not None:
            await self.jobs.retry_or_fail(record, lost, at)
        # Otherwise shutting down: the job stays in flight in the store, retried on restart.


class _JobProgress:
    """What the completion client reports of one running job (pools/completion.py,
    `Progress`): the first token moves the job to running, text goes to its followers.

    The first token's transition is written at the loop's next turn, not on the spot:
    when the job's end comes in the same read (a short job), `first_token_at` hands it
    to the runner, which writes both in one go. Either way the first token's write is
    queued before the job's end, so they are committed in that order, and the stream
    reads on meanwhile. `recorded` waits for a first token's write queued on its own."""

    def __init__(self, job_id: str, jobs: Jobs, outputs: OutputFeed) -> None:
        self.job_id = job_id
        self.jobs = jobs
        self.outputs = outputs
        self._at = 0
        self._due: asyncio.Handle | None = None
        self._running: asyncio.Future[None] | None = None

    def first_token(self) -> None:
        self._at = now_ms()
        self._due = asyncio.get_running_loop().call_soon(self.write_first_token)

    def write_first_token(self) -> None:
        """Queue the first token's write now, if it is due (before a failure's)."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
            self._running = asyncio.ensure_future(self.jobs.first_token(self.job_id, self._at))

    def first_token_at(self) -> int | None:
        """When the first token came, if its write is still to be made: then the caller
        makes it, with the job's end."""
        if self._due is None:
            return None
        self._due.cancel()
        self._due = None
        return self._at

    def text(self, text: str, tokens: int) -> None:
        self.outputs.append(self.job_id, text, tokens)

    async def recorded(self) -> None:
        if self._running is not None:
            await self._running
