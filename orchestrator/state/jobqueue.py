"""The queue of jobs waiting to be scheduled, as the live cluster state and the
simulator keep it. Pure.

Jobs stay in queue order (runtime-spec 3.1) by binary search, so an arrival or a
dispatch costs one insertion. The queue also remembers what changed since the last
context was taken (the context's `JobChanges`) and keeps running totals for
`ctx.metrics`, so that a cycle costs what changed rather than the queue's length.
"""

from __future__ import annotations

import bisect
import weakref
from collections import Counter

from orchestrator.domain.context import Context, Job, JobChanges, QueueTotals


class JobQueue:
    def __init__(self) -> None:
        self._keys: list[tuple[int, int, str]] = []  # parallel to _ordered
        self._ordered: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._changes: dict[str, Job | None] = {}  # None: removed
        self._priorities: Counter[str] = Counter()
        self._queued_at_sum = 0

    def __len__(self) -> int:
        return len(self._ordered)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def insert(self, job: Job) -> None:
        if job.id in self._jobs:
            self.remove(job.id)
        self._jobs[job.id] = job
        key = job.queue_key()
        index = bisect.bisect_left(self._keys, key)
        self._keys.insert(index, key)
        self._ordered.insert(index, job)
        self._changes[job.id] = job
        self._priorities[job.priority] += 1
        self._queued_at_sum += job.queued_at

    def remove(self, job_id: str) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        index = bisect.bisect_left(self._keys, job.queue_key())
        if index < len(self._keys) and self._ordered[index].id == job_id:
            del self._keys[index]
            del self._ordered[index]
        self._changes[job_id] = None
        self._priorities[job.priority] -= 1
        self._queued_at_sum -= job.queued_at
        return job

    def jobs(self) -> tuple[Job, ...]:
        return tuple(self._ordered)

    def totals(self) -> QueueTotals:
        return QueueTotals(
            count=len(self._ordered),
            interactive=self._priorities["interactive"],
            batch=self._priorities["batch"],
            queued_at_sum=self._queued_at_sum,
        )

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
