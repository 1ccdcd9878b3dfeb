"""The live queue's snapshots (issue 17): a context's queue is a view that answers
lookups, lengths and totals as it was when taken, while the live queue goes on
changing, and is built in full only when something reads all of it."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.domain.context import Job, QueueTotals
from orchestrator.domain.decision import Dispatch
from orchestrator.domain.jobs import JobState
from orchestrator.scheduling.validation import validate
from orchestrator.state.jobqueue import MAX_OPEN_SNAPSHOTS, JobQueue
from orchestrator.state.journal import SnapshotJournal
from tests.fakes import record
from tests.state.test_cluster import NOW, cluster

TENANTS = (None, "tenant-a", "tenant-b")


def job(number: int, tenant: int, interactive: bool, at: int) -> Job:
    priority = "interactive" if interactive else "batch"
    return Job(f"j{number}", "m", priority, tenant_id=TENANTS[tenant], queued_at=at)


jobs = st.builds(job, st.integers(0, 40), st.integers(0, 2), st.booleans(), st.integers(0, 20))
steps = st.lists(
    st.lists(st.one_of(jobs, st.integers(0, 40).map(lambda n: f"j{n}")), max_size=12),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(initial=st.lists(jobs, max_size=30), steps=steps)
def test_a_snapshot_answers_as_the_queue_was_when_taken(
    initial: list[Job], steps: list[list[Job | str]]
) -> None:
    """Every snapshot taken between arbitrary arrivals, re-queues and departures answers
    lookups, its length, its totals (overall and by tenant) and its ordered jobs as the
    queue was at that instant."""
    queue = JobQueue()
    for j in initial:
        queue.insert(j)
    taken = []
    for changes in steps:
        expected = tuple(sorted(queue._jobs.values(), key=Job.queue_key))
        taken.append((queue.snapshot(), expected))
        for change in changes:
            if isinstance(change, Job):
                queue.insert(change)
            else:
                queue.remove(change)
    for snapshot, expected in taken:
        by_id = {j.id: j for j in expected}
        for n in range(41):
            assert snapshot.lookup(f"j{n}") == by_id.get(f"j{n}")
        assert len(snapshot) == len(expected)
        assert snapshot.totals() == QueueTotals.of(expected)
        for tenant in ("tenant-a", "tenant-b"):
            mine = tuple(j for j in expected if j.tenant_id == tenant)
            assert snapshot.totals(tenant) == QueueTotals.of(mine)
            assert tuple(snapshot.for_tenant(tenant)) == mine
        assert tuple(snapshot) == expected and snapshot == expected


def test_a_delta_cycle_never_builds_the_queue() -> None:
    """The live path of a cycle (the cluster state's context, the journal's delta, the
    validator's lookups) leaves the queue view unbuilt: what it costs follows the jobs
    that changed, not the jobs queued. Only the first context, sent in full, is built."""
    state = cluster()
    for i in range(50):
        state.enqueue(record(f"j{i}", at=i), NOW)
    journal = SnapshotJournal()
    first = state.context(NOW)
    journal.advance(first)
    assert first.queue[0].id == "j0"  # sent in full: built
    state.enqueue(record("late", at=99), NOW)
    state.start(dataclasses.replace(record("j0"), state=JobState.DISPATCHED, worker_id="w1"))
    ctx = state.context(NOW + 1)
    journal.advance(ctx)
    delta = journal.request_for(journal.epoch, journal.seq - 1).deltas[0]
    assert list(delta.remove_jobs) == ["j0"] and list(delta.upsert_jobs.id) == ["late"]
    validate(Dispatch(job_id="j7", worker_id="nowhere"), ctx)
    assert ctx.jobs_by_id.get("j7") is not None and "j0" not in ctx.jobs_by_id
    assert ctx.metrics.queue_depth == 50
    assert ctx.queue._jobs is None  # type: ignore[attr-defined]


def test_old_snapshots_past_the_bound_are_built_and_let_go() -> None:
    """A caller that keeps many contexts alive costs the queue a bounded amount per change:
    past MAX_OPEN_SNAPSHOTS the oldest is built in full and stops following the queue,
    and still answers as it was."""
    queue = JobQueue()
    queue.insert(job(0, 0, False, 0))
    kept = [queue.snapshot() for _ in range(MAX_OPEN_SNAPSHOTS + 2)]
    queue.remove("j0")
    assert len(queue._open) == MAX_OPEN_SNAPSHOTS
    assert all(s.lookup("j0") is not None and len(s) == 1 for s in kept)
    assert len(queue.snapshot()) == 0
