"""The queue of jobs waiting to be scheduled, as the live cluster state and the
simulator keep it. Pure.

Jobs stay in queue order (runtime-spec 3.1) by binary search, so an arrival or a
dispatch costs one insertion. The queue logs what changed as it changes (the
context's `JobChanges`), keeps running totals for `ctx.metrics`, and hands each
context a `QueueSnapshot`: a view that is never copied unless something reads the
whole queue. Together they make a cycle cost what changed, not the queue's length
(issue 17).
"""

from __future__ import annotations

import bisect
import heapq
import weakref
from collections import Counter

from orchestrator.domain.context import Context, Job, JobChanges, QueueTotals, QueueView

# Snapshots still alive that the queue keeps answering for. Each costs a dict write per
# change; past this many, the oldest is built in full and let go (the service holds
# two or three: the journals' last contexts and the cycle being applied).
MAX_OPEN_SNAPSHOTS = 8
_UNSET = object()


class JobQueue:
    def __init__(self) -> None:
        self._keys: list[tuple[int, int, str]] = []  # parallel to _ordered
        self._ordered: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._changes: dict[str, Job | None] = {}  # None: removed
        self._priorities: Counter[str] = Counter()
        self._queued_at_sum = 0
        # tenant ("" without one) -> [count, interactive, batch, queued_at_sum]
        self._tenant_totals: dict[str, list[int]] = {}
        self._open: list[weakref.ref[QueueSnapshot]] = []

    def __len__(self) -> int:
        return len(self._ordered)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def insert(self, job: Job) -> None:
        if job.id in self._jobs:
            self.remove(job.id)
        self._remember(job.id, None)
        self._jobs[job.id] = job
        key = job.queue_key()
        index = bisect.bisect_left(self._keys, key)
        self._keys.insert(index, key)
        self._ordered.insert(index, job)
        self._changes[job.id] = job
        self._count(job, 1)

    def remove(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        self._remember(job_id, job)
        del self._jobs[job_id]
        index = bisect.bisect_left(self._keys, job.queue_key())
        if index < len(self._keys) and self._ordered[index].id == job_id:
            del self._keys[index]
            del self._ordered[index]
        self._changes[job_id] = None
        self._count(job, -1)
        return job

    def _count(self, job: Job, sign: int) -> None:
        self._priorities[job.priority] += sign
        self._queued_at_sum += sign * job.queued_at
        tenant = job.tenant_id or ""
        totals = self._tenant_totals.get(tenant)
        if totals is None:
            totals = self._tenant_totals[tenant] = [0, 0, 0, 0]
        totals[0] += sign
        totals[1] += sign * (job.priority == "interactive")
        totals[2] += sign * (job.priority == "batch")
        totals[3] += sign * job.queued_at
        if totals[0] == 0:
            del self._tenant_totals[tenant]  # tenant ids are the client's: keep no empty ones

    def _remember(self, job_id: str, before: Job | None) -> None:
        """Before `job_id` changes: the open snapshots keep what it was (first change wins)."""
        if not self._open:
            return
        dead = False
        for ref in self._open:
            snapshot = ref()
            if snapshot is None:
                dead = True
            elif job_id not in snapshot._before:
                snapshot._before[job_id] = before
        if dead:
            self._open = [ref for ref in self._open if ref() is not None]

    def snapshot(self) -> QueueSnapshot:
        """The queue as it is now, for a context: O(1), whatever the queue's length."""
        snapshot = QueueSnapshot(self)
        self._open.append(weakref.ref(snapshot))
        if len(self._open) > MAX_OPEN_SNAPSHOTS:
            oldest = self._open.pop(0)()
            if oldest is not None:
                oldest.detach()
        return snapshot

    def totals(self) -> QueueTotals:
        return QueueTotals(
            count=len(self._ordered),
            interactive=self._priorities["interactive"],
            batch=self._priorities["batch"],
            queued_at_sum=self._queued_at_sum,
        )

    def tenant_totals(self, tenant_id: str) -> QueueTotals:
        count, interactive, batch, queued_at_sum = self._tenant_totals.get(tenant_id, (0, 0, 0, 0))
        return QueueTotals(count, interactive, batch, queued_at_sum)

    def take_changes(self, last: Context | None) -> JobChanges | None:
        """What changed since `last` (the previous context taken); starts afresh."""
        changes = None
        if last is not None:
            changes = JobChanges(
                weakref.ref(last),
                upserted=tuple(j for j in self._changes.values() if j is not None),
                removed=frozenset(k for k, j in self._changes.items() if j is None),
            )
        self._changes = {}
        return changes

    def _unregister(self, snapshot: QueueSnapshot) -> None:
        # By identity: == on views compares their jobs.
        self._open = [ref for ref in self._open if (s := ref()) is not None and s is not snapshot]


class QueueSnapshot(QueueView):
    """The queue at one instant, answered from the live queue and what changed since.

    While the queue changes, it writes each job's value from before its first change
    into `_before` (None: the job was not queued then). A lookup reads `_before`,
    then the live queue; totals are the live totals corrected by `_before`; the
    whole tuple is the live order with the changed jobs put back as they were.
    """

    __slots__ = ("_before", "_index", "_queue", "_totals")

    def __init__(self, queue: JobQueue) -> None:
        super().__init__()
        self._queue: JobQueue | None = queue
        self._before: dict[str, Job | None] = {}
        self._totals = queue.totals()
        self._index: dict[str, Job] | None = None  # once detached

    def lookup(self, job_id: str) -> Job | None:
        queue = self._queue
        if queue is None:
            if self._index is None:
                self._index = {job.id: job for job in self.materialized()}
            return self._index.get(job_id)
        before = self._before.get(job_id, _UNSET)
        if before is _UNSET:
            return queue._jobs.get(job_id)
        return before  # type: ignore[return-value]

    def totals(self, tenant_id: str | None = None) -> QueueTotals:
        if tenant_id is None:
            return self._totals
        queue = self._queue
        if queue is None:
            return QueueTotals.of(self.for_tenant(tenant_id).materialized())
        count, interactive, batch, queued_at_sum = queue._tenant_totals.get(tenant_id, (0, 0, 0, 0))
        for job_id, before in self._before.items():
            for job, sign in ((queue._jobs.get(job_id), -1), (before, 1)):
                if job is not None and (job.tenant_id or "") == tenant_id:
                    count += sign
                    interactive += sign * (job.priority == "interactive")
                    batch += sign * (job.priority == "batch")
                    queued_at_sum += sign * job.queued_at
        return QueueTotals(count, interactive, batch, queued_at_sum)

    def _build(self) -> tuple[Job, ...]:
        queue = self._queue
        assert queue is not None, "a detached snapshot is built before it detaches"
        before = self._before
        if not before:
            return tuple(queue._ordered)
        kept = [job for job in queue._ordered if job.id not in before]
        restored = sorted((job for job in before.values() if job is not None), key=Job.queue_key)
        return tuple(heapq.merge(kept, restored, key=Job.queue_key))

    def detach(self) -> None:
        """Stop following the live queue: built in full now, answered from that."""
        if self._queue is not None:
            self.materialized()
            self._queue = None
            self._before = {}

    def materialized(self) -> tuple[Job, ...]:
        jobs = super().materialized()
        if self._queue is not None:
            # Built: nothing more to follow. Lookups then use an index of the tuple.
            self._queue._unregister(self)
            self._queue = None
            self._before = {}
        return jobs
