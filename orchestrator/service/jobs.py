"""Jobs and their state machine, as the service runs it.

Every change follows one order: durable first (the transition is committed to the
job store), then live (the cluster state the next cycle's context is built from),
then told (a job event for watchers, a metric). A transition the store refuses (the
job moved on meanwhile: cancelled, completed by a late reply) changes nothing else.
The transitions themselves are `orchestrator/domain/transitions.py`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Mapping, Sequence
from typing import Protocol

from orchestrator.domain import transitions
from orchestrator.domain.context import Catalog, QueueConfig, RetryConfig, Tenant
from orchestrator.domain.errors import DrainingError, InvalidRequestError, NotFoundError
from orchestrator.domain.jobs import (
    JobRecord,
    JobState,
    SubmitLimits,
    SubmitSpec,
    TenantLimits,
    in_scope,
    new_record,
    retry_delay_ms,
    validate_submit,
)
from orchestrator.domain.transitions import Transition
from orchestrator.service.admission import Admission
from orchestrator.service.events import JobEvents
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.state.cluster import last_midnight_utc_ms
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger

log = get_logger("service")

# Jobs that ended lately are answered from memory (a client's Get, Watch or stream
# that follows a job often arrives just after a short one ended), at most so many and
# so many bytes of prompt and output. An ended job never changes: none is stale.
ENDED_KEPT = 4096
ENDED_KEPT_BYTES = 16 * 2**20
# Job ids are 64 random bits each, from the OS's CSPRNG, drawn this many at a time:
# a call into the OS releases the GIL, which a busy event loop then waits to get back.
IDS_PER_DRAW = 512


class JobStorage(Protocol):
    """The durable job store (orchestrator/state/store.py, AsyncJobStore). A write is
    queued when `insert` or `apply` is called, and writes are committed in the order
    of the calls; each awaitable ends once its write is committed."""

    def insert(self, record: JobRecord) -> Awaitable[tuple[JobRecord, bool]]: ...
    async def by_request(self, tenant_id: str | None, request_id: str) -> JobRecord | None: ...
    def apply(self, transitions: Sequence[Transition]) -> Awaitable[list[JobRecord | None]]: ...
    async def get(self, job_id: str) -> JobRecord | None: ...
    async def list_jobs(
        self, states: Sequence[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]: ...
    async def active(self) -> list[JobRecord]: ...
    async def tokens_since(self, since_ms: int) -> dict[str, int]: ...


class LiveJobs(Protocol):
    """The jobs in the live cluster state (orchestrator/state/cluster.py, ClusterState)."""

    catalog: Catalog
    tenant_quotas: dict[str, Tenant]
    records: dict[str, JobRecord]

    @property
    def queue_depth(self) -> int: ...
    @property
    def queued_prompt_bytes(self) -> int: ...
    def tenant_queued(self, tenant: str) -> tuple[int, int]: ...
    def enqueue(self, record: JobRecord, at_ms: int) -> None: ...
    def start(self, record: JobRecord) -> tuple[int, int]: ...
    def attempt_failed(self, record: JobRecord) -> None: ...
    def update(self, record: JobRecord) -> None: ...
    def finish(self, job_id: str) -> None: ...
    def record_completion(self, record: JobRecord, worker_id: str, at_ms: int) -> None: ...
    def restore_tokens_today(self, tokens: dict[str, int], at_ms: int) -> None: ...


class OutputEnds(Protocol):
    """Who follows a job's output hears when it ends (service/outputs.py, JobOutputs)."""

    def end(self, record: JobRecord) -> None: ...


class Jobs:
    def __init__(
        self,
        store: JobStorage,
        live: LiveJobs,
        events: JobEvents,
        outputs: OutputEnds,
        metrics: ServiceMetrics,
        *,
        limits: SubmitLimits,
        queue: QueueConfig,
        retry: RetryConfig,
        platform_mode: bool,
        wake: asyncio.Event,
        tenant_limits: Mapping[str, TenantLimits] | None = None,
    ) -> None:
        self.store = store
        self.live = live
        self.events = events
        self.outputs = outputs
        self.metrics = metrics
        self.limits = limits
        self.admission = Admission(
            live, metrics, limits=limits, queue=queue, tenant_limits=tenant_limits or {}
        )
        self.retry = retry
        self.platform_mode = platform_mode
        self.wake = wake  # the scheduling loop's: a change worth a cycle
        self.draining = False
        self._ended: dict[str, JobRecord] = {}  # oldest first (ENDED_KEPT)
        self._ended_bytes = 0
        self._ids = b""  # random bytes drawn for ids, used from _ids_at on
        self._ids_at = 0

    def _new_id(self) -> str:
        if self._ids_at == len(self._ids):
            self._ids, self._ids_at = secrets.token_bytes(8 * IDS_PER_DRAW), 0
        self._ids_at += 8
        return "job-" + self._ids[self._ids_at - 8 : self._ids_at].hex()

    # ------------------------------------------------------------------ the API's side
    async def submit(self, spec: SubmitSpec) -> JobRecord:
        if self.draining:
            raise DrainingError("the orchestrator is draining; submit elsewhere or retry")
        catalog = self.live.catalog
        try:
            model_ref, priority = validate_submit(
                spec,
                catalog=catalog,
                tenants=self.live.tenant_quotas,
                limits=self.limits,
                platform_mode=self.platform_mode,
            )
        except InvalidRequestError as exc:
            self.metrics.rejected.labels(exc.field).inc()
            raise
        if spec.request_id:  # a client's retry of an accepted job: not admitted (charged) again
            known = await self.store.by_request(spec.tenant_id, spec.request_id)
            if known is not None:
                return known
        at = now_ms()
        record = new_record(self._new_id(), spec, model_ref, priority, catalog, at)
        with self.admission.admit(spec.tenant_id, record.held_bytes, record.tokens_estimate):
            stored, created = await self.store.insert(record)
            if created:
                self.live.enqueue(stored, at)
                self.metrics.submitted.inc()
                self.events.publish(stored, at, "submitted")
                self.wake.set()
        return stored

    async def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        """The job; with a `tenant` ("": none), only if it is that tenant's. Another
        tenant's job is not found, in the same words as an unknown one."""
        record = (
            self.live.records.get(job_id) or self._ended.get(job_id) or await self.store.get(job_id)
        )
        if record is None or not in_scope(record.tenant_id, tenant):
            raise NotFoundError(f"job {job_id!r} not found")
        return record

    async def list_jobs(
        self, states: Sequence[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        return await self.store.list_jobs(states, tenant_id, limit, after_seq)

    async def cancel_queued(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        """Cancel the job if it is queued; the job as it is afterwards either way. With
        a `tenant`, only that tenant's job (NotFoundError otherwise, as `get`)."""
        record = await self.get(job_id, tenant=tenant)
        if record.state != JobState.QUEUED:
            return record
        at = now_ms()
        (updated,) = await self.store.apply([transitions.cancel_queued(job_id, at)])
        if updated is not None:
            self._finished(updated, at, "cancelled by client")
            return updated
        return await self.get(job_id)  # it moved on meanwhile

    # ------------------------------------------------------------------ start-up
    async def recover(self) -> None:
        """Queued jobs go back in the queue; jobs that were running are retried; today's
        tokens by tenant are counted again, or a restart would reset daily quotas."""
        at = now_ms()
        self.live.restore_tokens_today(await self.store.tokens_since(last_midnight_utc_ms(at)), at)
        records = await self.store.active()
        requeued = retried = failed = 0
        changes = []
        for record in records:
            if record.state == JobState.QUEUED:
                self.live.enqueue(record, at)
                requeued += 1
                continue
            delay = retry_delay_ms(self.retry, record.attempts)
            if delay is None:
                changes.append(transitions.fail_after_restart(record.id, at))
                failed += 1
            else:
                changes.append(transitions.retry_after_restart(record.id, delay, at))
                retried += 1
        for updated in await self.store.apply(changes):
            if updated is not None and updated.state == JobState.QUEUED:
                self.live.enqueue(updated, at)
        if records:
            log.info("service.recovered", requeued=requeued, retried=retried, failed=failed)

    # ------------------------------------------------------------------ running them
    async def dispatch(
        self, batch: Sequence[tuple[JobRecord, str]], at: int
    ) -> list[JobRecord | None]:
        """Queued jobs to their workers, in one transaction; None where a job moved on
        (cancelled while the decision was being made or written)."""
        results = await self.store.apply([transitions.dispatch(r, w, at) for r, w in batch])
        for (_, worker_id), updated in zip(batch, results, strict=True):
            if updated is None:
                self.metrics.applied.labels("dispatch", "stale").inc()
                continue
            prompt, held = self.live.start(updated)
            self.metrics.prefix_tokens.labels("dispatched").inc(prompt)
            self.metrics.prefix_tokens.labels("matched").inc(held)
            self.metrics.applied.labels("dispatch", "applied").inc()
            self.metrics.dispatch_wait.observe(max(0, at - updated.queued_at) / 1000)
            self.events.publish(updated, at, f"dispatched to {worker_id}")
        return results

    def first_token(self, job_id: str, at: int) -> Awaitable[None]:
        """The attempt's first token came at `at`. Its transition is queued now, ahead of
        whatever the caller writes next (often in the same commit); the awaitable follows
        it to the live state and the watchers once committed, so that the stream it came
        in need not wait for the disk."""
        return self._running(self.store.apply([transitions.first_token(job_id, at)]), at)

    async def _running(self, written: Awaitable[list[JobRecord | None]], at: int) -> None:
        (updated,) = await written
        if updated is not None:
            self._run_on(updated, at)

    def _run_on(self, record: JobRecord, at: int) -> None:
        self.live.update(record)
        self.events.publish(record, at, "running")

    async def complete(
        self, job_id: str, worker_id: str, output: str, tokens: int, at: int, *,
        prompt_tokens: int = 0, finish_reason: str = "", first_token_at: int | None = None,
    ) -> None:  # fmt: skip
        """The attempt running on `worker_id` completed; with `first_token_at`, its first
        token, not written yet, is written with it (one write, the same two transitions).
        Its TTFT and TPOT are observed now, from the completed record, so that /metrics
        says what the record says."""
        done_by = transitions.complete(
            job_id, worker_id, output, tokens, at,
            prompt_tokens=prompt_tokens, finish_reason=finish_reason,
        )  # fmt: skip
        if first_token_at is None:
            (done,) = await self.store.apply([done_by])
        else:
            running, done = await self.store.apply(
                [transitions.first_token(job_id, first_token_at), done_by]
            )
            if running is not None:
                self._run_on(running, first_token_at)
        if done is not None:
            self.live.record_completion(done, worker_id, at)
            self.metrics.completed(done, known_tenants=self.platform_mode)
            self._finished(done, at, "completed")

    async def retry_or_fail(self, record: JobRecord, error: str, at: int) -> None:
        """A failed attempt: back to the queue under `retry`, or failed for good."""
        self.live.attempt_failed(record)
        delay = retry_delay_ms(self.retry, record.attempts)
        if delay is None:
            (failed,) = await self.store.apply([transitions.fail(record.id, error, at)])
            if failed is not None:
                self._finished(failed, at, error)
            return
        (queued,) = await self.store.apply([transitions.retry(record.id, error, delay, at)])
        if queued is not None:
            self.metrics.retried.inc()
            self.live.enqueue(queued, at)
            self.outputs.end(queued)
            self.events.publish(queued, at, f"retry in {delay} ms: {error}")
            self.wake.set()

    async def cancel_in_flight(self, job_id: str, at: int) -> None:
        (cancelled,) = await self.store.apply([transitions.cancel_in_flight(job_id, at)])
        if cancelled is not None:
            self._finished(cancelled, at, "cancelled by client")

    def _finished(self, record: JobRecord, at: int, detail: str) -> None:
        self._keep_ended(record)
        self.live.finish(record.id)
        self.metrics.finished.labels(record.state).inc()
        self.outputs.end(record)
        self.events.publish(record, at, detail)
        self.wake.set()

    def _keep_ended(self, record: JobRecord) -> None:
        self._ended[record.id] = record
        self._ended_bytes += _size(record)
        while len(self._ended) > ENDED_KEPT or self._ended_bytes > ENDED_KEPT_BYTES:
            oldest = self._ended.pop(next(iter(self._ended)))
            self._ended_bytes -= _size(oldest)


def _size(record: JobRecord) -> int:
    """What an ended job holds in memory, roughly: its prompt and its output."""
    return record.held_bytes + len(record.output)
