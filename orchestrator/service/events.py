"""Job events: every state change of a job, told to whoever watches (JobService.Watch).

Watchers subscribe to one job or to all, as a caller whose job scope is a tenant (only
that tenant's jobs' events reach it) or every tenant (None). Each has a bounded queue:
a watcher that falls behind is ended with RateLimitedError, after the events before the
gap, rather than holding memory, slowing the service or silently missing events.
Events carry the job without its prompt (JobInfo has none): a watcher's buffer holds no
prompts, and an all-jobs watcher never sees one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator.domain.errors import RateLimitedError
from orchestrator.domain.jobs import JobRecord, in_scope
from orchestrator.support.log import get_logger

log = get_logger("service")

# How far a watcher may fall behind: events, and the bytes of what they carry (a
# completed job's output can be long). A job makes four events or so, so a watcher of
# every job of a service at 1,000 requests a second takes 4,000 a second: this is a
# second of them, which a client that is reading never lags by; one that is further
# behind is stuck, or reads too slowly. The bytes bound the memory either way.
WATCHER_QUEUE = 4096
WATCHER_BYTES = 4 * 2**20
EVENT_BYTES = 512  # a record's fixed fields, counted for every event


@dataclass(frozen=True)
class JobEvent:
    record: JobRecord  # without its prompt
    at_ms: int
    detail: str = ""

    @property
    def size(self) -> int:
        """Roughly the bytes this event holds, for a watcher's bound."""
        return EVENT_BYTES + len(self.record.output) + len(self.record.error) + len(self.detail)


class Watch(asyncio.Queue[JobEvent]):
    """One watcher's events, bounded by WATCHER_QUEUE events and WATCHER_BYTES. When an
    event does not fit, the watcher has fallen behind: it gets no more events, and once
    it has read those before the gap, `get` raises RateLimitedError (RESOURCE_EXHAUSTED):
    the client knows that it missed events and may watch again."""

    def __init__(self, tenant: str | None) -> None:
        super().__init__(maxsize=WATCHER_QUEUE)
        self.tenant = tenant  # the watcher's job scope: None sees every tenant's jobs
        self.behind = False
        self._bytes = 0

    def offer(self, event: JobEvent) -> None:
        if self.behind:
            return
        size = event.size
        # An empty queue takes any one event, however large: it can be read.
        if self.full() or (not self.empty() and self._bytes + size > WATCHER_BYTES):
            self.behind = True
            log.warning("service.watcher_behind", events=self.qsize(), bytes=self._bytes)
            return
        self._bytes += size
        self.put_nowait(event)

    async def get(self) -> JobEvent:
        self._end_if_behind()
        return await super().get()

    def get_nowait(self) -> JobEvent:
        self._end_if_behind()
        event = super().get_nowait()
        self._bytes -= event.size
        return event

    def _end_if_behind(self) -> None:
        if self.behind and self.empty():
            raise RateLimitedError(
                f"this watch fell more than {WATCHER_QUEUE} events or {WATCHER_BYTES >> 20} MiB "
                "behind and missed later events; read faster, or watch fewer jobs, and "
                "watch again (Get gives a job's current state)"
            )


class JobEvents:
    def __init__(self) -> None:
        self._subscribers: dict[str | None, set[Watch]] = {}

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str | None, *, tenant: str | None = None
    ) -> AsyncIterator[Watch]:
        """The events of `job_id` (None: of every job) while the context is open; with a
        `tenant`, only of that tenant's jobs ("": of jobs without a tenant)."""
        watch = Watch(tenant)
        self._subscribers.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._subscribers[job_id]
            watchers.discard(watch)
            if not watchers:  # job ids are the client's: keep no empty entries
                del self._subscribers[job_id]

    def publish(self, record: JobRecord, at: int, detail: str) -> None:
        watchers = [
            watch
            for key in (record.id, None)
            for watch in self._subscribers.get(key, ())
            if in_scope(record.tenant_id, watch.tenant)
        ]
        if not watchers:
            return
        event = JobEvent(dataclasses.replace(record, prompt=""), at, detail)
        for watch in watchers:
            watch.offer(event)
