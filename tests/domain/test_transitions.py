"""The job state machine: each named transition, and the store applying them
conditionally (a job completes at most once, however its replies race)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator.domain import transitions
from orchestrator.domain.jobs import ACTIVE, IN_FLIGHT, TERMINAL, JobRecord, JobState
from orchestrator.domain.transitions import JobUpdate, Transition
from orchestrator.state.store import JobStore
from tests.fakes import record

AT = 5_000


def test_a_job_update_names_only_job_record_fields() -> None:
    """Updates are typed; the store maps their names to columns one to one."""
    columns = {f.name for f in dataclasses.fields(JobRecord)}
    names = {f.name for f in dataclasses.fields(JobUpdate)} - {"requeue"}
    assert names <= columns
    update = JobUpdate(finished_at=AT, error="boom", requeue=True)
    assert dict(update.assignments()) == {
        "finished_at": AT, "error": "boom", "worker_id": None, "first_token_at": None,
    }  # fmt: skip


def test_the_states_partition_into_active_and_terminal() -> None:
    assert set(JobState) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL
    assert IN_FLIGHT < ACTIVE and JobState.QUEUED.value == "queued"


@pytest.mark.parametrize(
    ("transition", "from_states", "to_state"),
    [
        (transitions.dispatch(record("j"), "w1", AT), {JobState.QUEUED}, JobState.DISPATCHED),
        (transitions.first_token("j", AT), {JobState.DISPATCHED}, JobState.RUNNING),
        (transitions.complete("j", "w1", "out", 2, AT), IN_FLIGHT, JobState.COMPLETED),
        (transitions.fail("j", "boom", AT), IN_FLIGHT, JobState.FAILED),
        (transitions.retry("j", "boom", 100, AT), IN_FLIGHT, JobState.QUEUED),
        (transitions.cancel_queued("j", AT), {JobState.QUEUED}, JobState.CANCELLED),
        (transitions.cancel_in_flight("j", AT), IN_FLIGHT, JobState.CANCELLED),
        (transitions.fail_after_restart("j", AT), IN_FLIGHT, JobState.FAILED),
        (transitions.retry_after_restart("j", 100, AT), IN_FLIGHT, JobState.QUEUED),
    ],
)
def test_each_transition_goes_from_and_to_the_documented_states(
    transition: Transition, from_states: set[JobState], to_state: JobState
) -> None:
    assert (transition.from_states, transition.to_state) == (from_states, to_state)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_a_job_completes_once_when_replies_race(store: JobStore) -> None:
    store.insert(record("j"))
    (dispatched,) = store.apply([transitions.dispatch(record("j"), "w1", AT)])
    assert dispatched is not None and dispatched.state == JobState.DISPATCHED
    assert (dispatched.attempts, dispatched.dispatched_at, dispatched.worker_id) == (1, AT, "w1")
    done, late = store.apply([
        transitions.complete("j", "w1", "first", 1, AT + 1),
        transitions.complete("j", "w1", "second", 2, AT + 2),
    ])  # fmt: skip
    assert done is not None and done.output == "first" and late is None
    assert [state for _, state, _, _ in store.transitions("j")] == [
        "queued", "dispatched", "completed",
    ]  # fmt: skip


def test_a_retry_clears_the_worker_and_waits_out_the_backoff(store: JobStore) -> None:
    """The failed attempt's first token goes too: the job's TTFT is the completing
    attempt's, and the attempt to come may complete without sending any text."""
    store.insert(record("j"))
    store.apply([transitions.dispatch(record("j"), "w1", AT), transitions.first_token("j", AT)])
    (queued,) = store.apply([transitions.retry("j", "worker unreachable", 250, AT + 10)])
    assert queued is not None and queued.state == JobState.QUEUED
    assert (queued.worker_id, queued.not_before, queued.error, queued.first_token_at) == (
        None,
        AT + 260,
        "worker unreachable",
        None,
    )
    assert queued.attempts == 1  # counted at dispatch, not at retry


def test_a_cancelled_job_cannot_be_dispatched(store: JobStore) -> None:
    store.insert(record("j"))
    (cancelled,) = store.apply([transitions.cancel_queued("j", AT)])
    assert cancelled is not None and cancelled.finished_at == AT
    assert store.apply([transitions.dispatch(record("j"), "w1", AT + 1)]) == [None]
    stored = store.get("j")
    assert stored is not None and stored.state == JobState.CANCELLED
