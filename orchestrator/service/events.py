"""Job events: every state change of a job, told to whoever watches (JobService.Watch).

Watchers subscribe to one job or to all. Each has a bounded queue: a watcher that
stops reading loses events rather than holding memory or slowing the service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator.domain.jobs import JobRecord

WATCHER_QUEUE = 10_000


@dataclass(frozen=True)
class JobEvent:
    record: JobRecord
    at_ms: int
    detail: str = ""


class JobEvents:
    def __init__(self) -> None:
        self._subscribers: dict[str | None, set[asyncio.Queue[JobEvent]]] = {}

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str | None) -> AsyncIterator[asyncio.Queue[JobEvent]]:
        """The events of `job_id` (None: of every job) while the context is open."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=WATCHER_QUEUE)
        self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            self._subscribers[job_id].discard(queue)

    def publish(self, record: JobRecord, at: int, detail: str) -> None:
        event = JobEvent(record, at, detail)
        for key in (record.id, None):
            for queue in self._subscribers.get(key, ()):
                with contextlib.suppress(asyncio.QueueFull):  # a stuck watcher loses events
                    queue.put_nowait(event)
