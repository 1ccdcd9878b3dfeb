"""The job state machine: every way a job changes state, as a named builder. Pure.

    queued ──dispatch──▶ dispatched ──first_token──▶ running
       ▲                      │                          │
       └────── retry ─────────┴──────────────────────────┤  (attempts left)
                              ├──── complete ────────────┤──▶ completed
                              ├──── fail ────────────────┤──▶ failed
                              └──── cancel_in_flight ────┘──▶ cancelled
    queued ──cancel_queued──▶ cancelled

A `Transition` is conditional: the store applies it only while the job is still in
one of `from_states`, so a job completes at most once even when a late worker reply
races a retry or a cancel. Besides the state, a transition sets the fields in its
`JobUpdate`; each builder says which, so no caller names a column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.domain.jobs import IN_FLIGHT, JobRecord, JobState

RESTART_ERROR = "orchestrator restarted"


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """The fields a transition sets besides the state. None leaves a field as it is;
    `requeue` empties `worker_id` and `first_token_at` (a job going back to the queue:
    no worker, and no first token yet of the attempt to come)."""

    attempts: int | None = None
    not_before: int | None = None
    dispatched_at: int | None = None
    finished_at: int | None = None
    worker_id: str | None = None
    requeue: bool = False
    output: str | None = None
    tokens_generated: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    first_token_at: int | None = None
    finish_reason: str | None = None

    def assignments(self) -> Iterator[tuple[str, object]]:
        """(JobRecord field, new value) for every field this update sets."""
        for field in dataclasses.fields(self):
            if field.name == "requeue":
                continue
            value = getattr(self, field.name)
            if value is not None:
                yield field.name, value
        if self.requeue:
            yield "worker_id", None
            yield "first_token_at", None


@dataclass(frozen=True, slots=True)
class Transition:
    """A conditional state change: applied only if the job is in one of `from_states`."""

    job_id: str
    from_states: frozenset[JobState]
    to_state: JobState
    at: int
    detail: str = ""
    update: JobUpdate = JobUpdate()


_QUEUED = frozenset({JobState.QUEUED})
_DISPATCHED = frozenset({JobState.DISPATCHED})


def dispatch(record: JobRecord, worker_id: str, at: int) -> Transition:
    """A queued job goes to a worker: one more attempt."""
    update = JobUpdate(attempts=record.attempts + 1, dispatched_at=at, worker_id=worker_id)
    return Transition(record.id, _QUEUED, JobState.DISPATCHED, at, f"to {worker_id}", update)


def first_token(job_id: str, at: int) -> Transition:
    """The worker sent this attempt's first token (the completing attempt's is the
    job's TTFT, docs/ARCHITECTURE.md D28)."""
    return Transition(
        job_id, _DISPATCHED, JobState.RUNNING, at, update=JobUpdate(first_token_at=at)
    )


def complete(
    job_id: str, worker_id: str, output: str, tokens: int, at: int, *,
    prompt_tokens: int = 0, finish_reason: str = "",
) -> Transition:  # fmt: skip
    update = JobUpdate(
        finished_at=at, output=output, tokens_generated=tokens, prompt_tokens=prompt_tokens,
        finish_reason=finish_reason,
    )  # fmt: skip
    return Transition(job_id, IN_FLIGHT, JobState.COMPLETED, at, f"on {worker_id}", update)


def fail(job_id: str, error: str, at: int, *, detail: str | None = None) -> Transition:
    """An in-flight job failed for good (no attempt left)."""
    update = JobUpdate(finished_at=at, error=error)
    return Transition(job_id, IN_FLIGHT, JobState.FAILED, at, error if detail is None else detail,
                      update)  # fmt: skip


def retry(job_id: str, error: str, delay_ms: int, at: int) -> Transition:
    """An in-flight job failed and goes back to the queue, not before its backoff ends."""
    update = JobUpdate(not_before=at + delay_ms, requeue=True, error=error)
    return Transition(job_id, IN_FLIGHT, JobState.QUEUED, at, f"retry: {error}", update)


def cancel_queued(job_id: str, at: int) -> Transition:
    return Transition(job_id, _QUEUED, JobState.CANCELLED, at, "cancelled by client",
                      JobUpdate(finished_at=at))  # fmt: skip


def cancel_in_flight(job_id: str, at: int) -> Transition:
    return Transition(job_id, IN_FLIGHT, JobState.CANCELLED, at, "cancelled by client",
                      JobUpdate(finished_at=at))  # fmt: skip


def fail_after_restart(job_id: str, at: int) -> Transition:
    """A job that was in flight when the orchestrator stopped, with no attempt left."""
    return fail(job_id, RESTART_ERROR, at, detail="no attempt left after restart")


def retry_after_restart(job_id: str, delay_ms: int, at: int) -> Transition:
    """A job that was in flight when the orchestrator stopped goes back to the queue."""
    update = JobUpdate(not_before=at + delay_ms, requeue=True)
    return Transition(job_id, IN_FLIGHT, JobState.QUEUED, at, "retry after restart", update)
