"""Group commit in the job store: writes that arrive together are committed together,
every writer hears back only once its write is durable, and a batch that cannot be
committed fails every writer in it and keeps nothing of it, while what was
acknowledged before stays."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.domain import transitions
from orchestrator.domain.jobs import JobState
from orchestrator.state.store import MAX_BATCH, AsyncJobStore, JobStore, StoreError
from tests.conftest import REPO
from tests.fakes import record


class CountedStore(JobStore):
    """The real store, counting its commits."""

    commits = 0

    def commit(self) -> None:
        self.commits += 1
        super().commit()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncJobStore]:
    store = AsyncJobStore(CountedStore(tmp_path / "jobs.sqlite3"))
    yield store
    await store.close()


def commits(store: AsyncJobStore) -> int:
    assert isinstance(store.store, CountedStore)
    return store.store.commits


async def test_concurrent_submits_are_all_stored_in_few_commits(
    store: AsyncJobStore, tmp_path: Path
) -> None:
    count = MAX_BATCH + 100  # more than one batch
    before = commits(store)
    stored = await asyncio.gather(*(store.insert(record(f"job-{i}")) for i in range(count)))
    assert all(created for _, created in stored)
    assert sorted(job.seq for job, _ in stored) == list(range(1, count + 1))
    # Queued in one turn of the loop, they are committed in full batches.
    assert commits(store) - before == 2
    # Durable: another connection to the file sees every one of them.
    other = JobStore(tmp_path / "jobs.sqlite3")
    assert len(other.active()) == count
    assert other.transitions("job-0") == [(1_000, "queued", 0, "submitted")]
    other.close()


async def test_writes_commit_in_the_order_of_the_calls(store: AsyncJobStore) -> None:
    """A write is queued when it is called: a job's first token and its end, written
    one after the other without waiting in between, land in that order."""
    job, _ = await store.insert(record("j"))
    (dispatched,) = await store.apply([transitions.dispatch(job, "w1", 2_000)])
    assert dispatched is not None
    running = store.apply([transitions.first_token("j", 2_100)])
    done = store.apply([transitions.complete("j", "w1", "out", 3, 2_200)])
    (after_first,), (after_end,) = await asyncio.gather(running, done)
    assert after_first is not None and after_first.state == JobState.RUNNING
    assert after_end is not None and after_end.state == JobState.COMPLETED
    assert after_end.first_token_at == 2_100
    states = [state for _, state, _, _ in store.store.transitions("j")]
    assert states == ["queued", "dispatched", "running", "completed"]


async def test_a_read_after_an_acknowledged_write_sees_it(store: AsyncJobStore) -> None:
    """Reads go through a connection of their own, which sees committed writes only:
    what a writer was told is written, it can read back."""
    await store.insert(record("j"))
    found = await store.get("j")
    assert found is not None and found.state == JobState.QUEUED
    assert [job.id for job in await store.list_jobs([], None, 10, 0)] == ["j"]


async def test_a_write_that_fails_fails_alone(store: AsyncJobStore) -> None:
    """A write that raises (here a second job with an id already taken) is undone
    alone: its caller gets the error, and the rest of its batch is committed."""
    await store.insert(record("taken"))
    first = store.insert(record("a"))
    again = store.insert(record("taken"))
    last = store.insert(record("b"))
    results = await asyncio.gather(first, again, last, return_exceptions=True)
    assert isinstance(results[1], sqlite3.IntegrityError)
    (a, _), (b, _) = results[0], results[2]  # type: ignore[misc]
    assert (a.seq, b.seq) == (2, 3)  # no seq lost to the write that failed
    assert {job.id for job in await store.active()} == {"taken", "a", "b"}


async def test_a_batch_that_cannot_commit_fails_every_writer_and_keeps_nothing(
    store: AsyncJobStore,
) -> None:
    """A failure at COMMIT (here a deferred constraint that a job named `job-poison`
    breaks, which SQLite checks only then) fails the whole batch: each of its writers
    gets StoreError, none of its writes is kept, what was acknowledged before stays,
    and the store goes on committing the batches after it."""
    store.store.db.executescript("""
        CREATE TABLE parent (id TEXT PRIMARY KEY);
        CREATE TABLE child (
            parent TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED
        );
        CREATE TRIGGER poison AFTER INSERT ON jobs WHEN NEW.id = 'job-poison'
        BEGIN INSERT INTO child VALUES ('missing'); END;
    """)
    acknowledged, _ = await store.insert(record("before"))
    batch = [store.insert(record(job_id)) for job_id in ("a", "job-poison", "b")]
    failures = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(f, StoreError) for f in failures)
    assert "could not commit" in str(failures[0])
    assert failures[0] is not failures[1]  # each writer raises its own
    assert [job.id for job in await store.active()] == ["before"]
    after, _ = await store.insert(record("after"))
    assert after.seq == acknowledged.seq + 1  # the failed batch's seqs were given back
    assert [job.id for job in await store.active()] == ["before", "after"]


def test_a_rollback_gives_back_the_seqs_it_took_and_no_other(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert(record("a"))  # committed on its own: seq 1
    (staged,) = store.stage([functools.partial(store.insert, record("b"))])
    assert staged == (dataclasses.replace(record("b"), seq=2), True)
    store.rollback()
    assert store.insert(record("c"))[0].seq == 2
    assert [job.id for job in store.active()] == ["a", "c"]
    store.close()


async def test_close_commits_what_is_queued_and_refuses_what_comes_after(
    tmp_path: Path,
) -> None:
    store = AsyncJobStore(JobStore(tmp_path / "jobs.sqlite3"))
    queued = [store.insert(record(f"job-{i}")) for i in range(10)]
    await store.close()
    assert all(created for _, created in await asyncio.gather(*queued))
    with pytest.raises(StoreError, match="closed"):
        await store.insert(record("late"))
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    assert len(reopened.active()) == 10
    reopened.close()


async def test_a_write_whose_caller_went_away_is_still_committed(store: AsyncJobStore) -> None:
    """Cancelling the wait does not take the write back (as a client that hangs up
    after its submit was sent): it is committed with its batch."""
    store.insert(record("j")).cancel()
    await store.insert(record("k"))  # queued after it: committed once "j" is
    assert {job.id for job in await store.active()} == {"j", "k"}


# A process that inserts jobs as fast as it can, prints each id once its insert was
# acknowledged, and kills itself with SIGKILL after ACKED of them, with more queued.
CRASHING_WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from orchestrator.state.store import AsyncJobStore, JobStore
    from tests.fakes import record

    ACKED = 300

    async def main() -> None:
        store = AsyncJobStore(JobStore(Path(sys.argv[1])))
        acked = 0

        async def one(i: int) -> None:
            nonlocal acked
            job, _ = await store.insert(record(f"job-{i}"))
            print(job.id, flush=True)
            acked += 1
            if acked == ACKED:
                os.kill(os.getpid(), signal.SIGKILL)

        await asyncio.gather(*(one(i) for i in range(10 * ACKED)))

    asyncio.run(main())
""")


def test_a_crash_between_batches_loses_no_acknowledged_job(tmp_path: Path) -> None:
    """The process dies (SIGKILL) with writes in flight: every job whose insert was
    acknowledged is in the store when it is opened again."""
    path = tmp_path / "jobs.sqlite3"
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    acknowledged = set(child.stdout.split())
    assert len(acknowledged) >= 300
    reopened = JobStore(path)
    stored = {job.id for job in reopened.active()}
    reopened.close()
    assert acknowledged <= stored
