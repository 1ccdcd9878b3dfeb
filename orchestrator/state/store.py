"""The durable job store: SQLite in WAL mode, with group commit.

Every accepted job and every state change is committed before it is acknowledged.
Transitions (orchestrator/domain/transitions.py) are conditional (`from_states`), so
a job completes at most once even when a late worker reply races a retry. The
`transitions` table is the audit trail: one row per change, which is what
"completed exactly once" is checked on.

Writes are group-committed (`AsyncJobStore`): the writes that arrive while a batch is
being committed are committed together as the next batch, in one transaction and one
fsync. A commit costs about the same for one write as for a hundred, so under load
the store keeps up by committing more per batch, and when idle a write is committed at
once. Every writer still hears back only once its own write is committed; a write
that fails fails alone (`JobStore.stage`); a batch that cannot be committed fails
every writer in it (`StoreError`), and keeps nothing of it.

A batch's statements run on the event loop, which they hold for tens of microseconds
each; only the commit, which waits for the disk, runs on the store's thread. Run on
the thread, every statement would wait to take the GIL back from a busy event loop.
Reads run on a thread of their own, on a connection of their own that sees committed
writes only: a long query (a List of many jobs) never holds a commit up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.domain.errors import ConfigError, ErrorCode, OrchestratorError
from orchestrator.domain.jobs import ACTIVE, JobRecord, JobState
from orchestrator.domain.transitions import Transition

T = TypeVar("T")

# Writes committed in one transaction at most: a batch's statements hold the event loop
# (a few tens of microseconds each), and its first writer waits for the last one's.
MAX_BATCH = 256

SCHEMA_VERSION = "3"
# The jobs table, named by {table} so that a migration can build it beside the old one.
# request_id is unique per tenant (jobs_request below), not globally: a tenant that
# knew or guessed another's request_id must not get that tenant's job back.
JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    request_id TEXT,
    tenant_id TEXT,
    session_id TEXT,
    priority TEXT NOT NULL,
    model_ref TEXT NOT NULL,
    prompt TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    max_tokens INTEGER NOT NULL,
    seed INTEGER,
    temperature REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    queued_at INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    dispatched_at INTEGER,
    finished_at INTEGER,
    worker_id TEXT,
    output TEXT NOT NULL,
    tokens_generated INTEGER NOT NULL,
    error TEXT NOT NULL,
    estimated_vram_bytes INTEGER NOT NULL,
    estimated_duration_ms INTEGER NOT NULL,
    {added}
)
"""
# Schema 3 (issue 15): chat messages, sampling, and what the worker reported. Added
# with ALTER TABLE to a schema-2 table, so each has a default.
ADDED_IN_3 = (
    ("messages", "TEXT NOT NULL DEFAULT ''"),
    ("stop", "TEXT NOT NULL DEFAULT '[]'"),  # a JSON list
    ("top_p", "REAL NOT NULL DEFAULT 1.0"),
    ("prompt_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("first_token_at", "INTEGER"),
    ("finish_reason", "TEXT NOT NULL DEFAULT ''"),
)
JOBS_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
    "CREATE INDEX IF NOT EXISTS jobs_tenant_finished ON jobs(tenant_id, finished_at)",
    # A job without a tenant is the tenant "" here, as everywhere (NULLs are distinct
    # in a unique index). Jobs without a request_id (NULL) never collide.
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs(COALESCE(tenant_id, ''), request_id)",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS transitions (
    job_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# One column per JobRecord field, named alike: a JobUpdate's field names are columns.
COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))
COLUMNS_2 = tuple(c for c in COLUMNS if c not in dict(ADDED_IN_3))
# Rows are read in JobRecord's field order (not `*`: a migrated table adds columns at
# its end), so that a row is the record's arguments as they stand.
SELECT_JOB = f"SELECT {', '.join(COLUMNS)} FROM jobs"
INSERT_JOB = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_SEQ, _STATE, _STOP, _ATTEMPTS = (COLUMNS.index(c) for c in ("seq", "state", "stop", "attempts"))


class StoreError(OrchestratorError):
    """The job store could not write (a disk error, the database locked by another
    process, the store closed). Nothing of the batch the write was in was kept: a job
    whose submit fails this way was not accepted."""

    code = ErrorCode.INTERNAL


def _jobs_table(table: str) -> str:
    added = ",\n    ".join(f"{name} {kind}" for name, kind in ADDED_IN_3)
    return JOBS_TABLE.format(table=table, added=added)


class _Reads:
    """The queries, on `db`: the writer's connection, or a reader's."""

    db: sqlite3.Connection

    def by_request(self, tenant_id: str | None, request_id: str) -> JobRecord | None:
        """The job `tenant_id` (None or "": none) submitted with `request_id`, if any."""
        row = self.db.execute(
            f"{SELECT_JOB} WHERE COALESCE(tenant_id, '') = ? AND request_id = ?",
            (tenant_id or "", request_id),
        ).fetchone()
        return None if row is None else _record(row)

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute(f"{SELECT_JOB} WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row is not None else None

    def active(self) -> list[JobRecord]:
        marks = ", ".join("?" * len(ACTIVE))
        rows = self.db.execute(
            f"{SELECT_JOB} WHERE state IN ({marks}) ORDER BY seq", tuple(ACTIVE)
        ).fetchall()
        return [_record(r) for r in rows]

    def list_jobs(
        self, states: Iterable[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        query = f"{SELECT_JOB} WHERE seq > ?"
        args: list[Any] = [after_seq]
        states = list(states)
        if states:
            query += f" AND state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        if tenant_id is not None:  # "": only jobs without a tenant
            query += " AND COALESCE(tenant_id, '') = ?"
            args.append(tenant_id)
        query += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [_record(r) for r in self.db.execute(query, args).fetchall()]

    def tokens_since(self, since_ms: int) -> dict[str, int]:
        """Tokens generated per tenant by jobs finished since `since_ms` (daily quotas)."""
        rows = self.db.execute(
            "SELECT tenant_id, SUM(tokens_generated) FROM jobs"
            " WHERE tenant_id IS NOT NULL AND finished_at >= ? GROUP BY tenant_id",
            (since_ms,),
        ).fetchall()
        return {r[0]: int(r[1] or 0) for r in rows}

    def transitions(self, job_id: str) -> list[tuple[int, str, int, str]]:
        rows = self.db.execute(
            "SELECT at, state, attempt, detail FROM transitions WHERE job_id = ? ORDER BY rowid",
            (job_id,),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def close(self) -> None:
        self.db.close()


class JobReader(_Reads):
    """A connection of its own for queries, which sees committed writes only (WAL)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA query_only=ON")


class JobStore(_Reads):
    """Synchronous SQLite access, and the database's only writer; use `AsyncJobStore`
    from the event loop."""

    def __init__(self, path: Path, *, durability: str = "full") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The last seq given out, and the last one committed (what a rollback goes back
        # to). This connection is the database's only writer, so the count lives here:
        # MAX(seq) has no index to read it from on every insert.
        self._seq = self._seq_committed = 0
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        with self._transaction():
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = row[0] if row is not None else SCHEMA_VERSION  # None: a new database
            if version == "1":
                self._migrate_from_1()
            elif version == "2":
                self._migrate_from_2()
            elif version != SCHEMA_VERSION:
                raise ConfigError(
                    f"{path}: job store schema {version} is not {SCHEMA_VERSION}: written by "
                    "another version of orchestratord"
                )
            self.db.execute(_jobs_table("jobs"))
            for index in JOBS_INDEXES:
                self.db.execute(index)
            self.db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
        (last,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        self._seq = self._seq_committed = int(last)

    def _migrate_from_1(self) -> None:
        """Schema 1 had `request_id TEXT UNIQUE`. SQLite cannot drop a column's
        constraint, so the table is rebuilt (https://sqlite.org/lang_altertable.html,
        "other kinds of table schema changes"), inside the caller's transaction: a
        crash leaves the old table as it was. Schema 1 held request_ids unique across
        all tenants, so its rows satisfy the new per-tenant uniqueness."""
        self.db.execute(_jobs_table("jobs_v3"))
        columns = ", ".join(COLUMNS_2)
        self.db.execute(f"INSERT INTO jobs_v3 ({columns}) SELECT {columns} FROM jobs")
        self.db.execute("DROP TABLE jobs")  # and its indexes, built again by the caller
        self.db.execute("ALTER TABLE jobs_v3 RENAME TO jobs")

    def _migrate_from_2(self) -> None:
        """Schema 3 only adds columns, each with its default (inside the caller's
        transaction, like every migration)."""
        for name, kind in ADDED_IN_3:
            self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def reader(self) -> JobReader:
        return JobReader(self.path)

    def next_seq(self) -> int:
        return self._seq + 1

    def insert(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Store a new job; with a request_id its tenant used before, return the first
        job instead (False)."""
        with self._transaction():
            if record.request_id is not None:
                existing = self.by_request(record.tenant_id, record.request_id)
                if existing is not None:
                    return existing, False
            seq = self._seq + 1
            values = [getattr(record, c) for c in COLUMNS]
            values[_SEQ] = seq
            record = JobRecord(*values)
            values[_STOP] = json.dumps(list(record.stop))
            self.db.execute(INSERT_JOB, values)
            self.db.execute(
                "INSERT INTO transitions VALUES (?, ?, ?, ?, ?)",
                (record.id, record.created_at, record.state, record.attempts, "submitted"),
            )
            self._seq = seq
        return record, True

    def apply(self, transitions: Sequence[Transition]) -> list[JobRecord | None]:
        """Apply transitions in one transaction; None where a condition did not hold."""
        out: list[JobRecord | None] = []
        with self._transaction():
            for t in transitions:
                assignments = list(t.update.assignments())
                names = tuple(name for name, _ in assignments)
                rows = self.db.execute(
                    _update_sql(names, len(t.from_states)),
                    (t.to_state, *(v for _, v in assignments), t.job_id, *t.from_states),
                ).fetchall()
                if not rows:
                    out.append(None)
                    continue
                (row,) = rows  # id is the primary key
                self.db.execute(
                    "INSERT INTO transitions VALUES (?, ?, ?, ?, ?)",
                    (t.job_id, t.at, t.to_state, row[_ATTEMPTS], t.detail),
                )
                out.append(_record(row))
        return out

    def stage(self, writes: Sequence[Callable[[], object]]) -> list[object]:
        """Begin a transaction and run `writes` (calls of `insert` and `apply`) in it, in
        order; `commit` ends it. A write that raises is undone alone, and its exception
        is its result: the transaction is rolled back and run again without it. Writes
        fail alone only by a bug (the disk's failures fail them all), so the common
        case pays for no savepoint per write. StoreError when the transaction cannot
        begin, or a failure ended it: then nothing of any of them is kept."""
        failed: dict[int, Exception] = {}
        while True:
            self.begin()
            results: list[object] = []
            for index, write in enumerate(writes):
                if index in failed:
                    results.append(failed[index])
                    continue
                try:
                    results.append(write())
                except Exception as exc:
                    ended = not self.db.in_transaction  # SQLite ended it: nothing is kept
                    self.rollback()  # what the write left half-done goes with the rest
                    if ended:
                        raise StoreError(f"the job store could not write: {exc}") from exc
                    failed[index] = exc
                    break
            else:
                return results

    def begin(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # locked by another process past the busy timeout
            raise StoreError(f"the job store cannot write: {exc}") from exc

    def commit(self) -> None:
        """Commit the open transaction; StoreError when it cannot be (the disk failed or
        filled), and then nothing of it is kept."""
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            raise StoreError(f"the job store could not commit: {exc}") from exc
        self._seq_committed = self._seq

    def rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._seq = self._seq_committed  # the rows that took the seqs since are gone

    def _transaction(self) -> _Tx:
        return _Tx(self)


class _Tx:
    """A transaction of `store`. Inside another one it is part of that one, which
    undoes it with the rest if it raises (`JobStore.stage` runs the others again)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.nested = False

    def __enter__(self) -> None:
        self.nested = self.store.db.in_transaction
        if not self.nested:
            self.store.begin()

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.nested:
            return
        if exc_type:
            self.store.rollback()
        else:
            self.store.commit()


@functools.cache
def _update_sql(names: tuple[str, ...], from_states: int) -> str:
    """A transition's UPDATE, by the fields it sets and how many states it is from."""
    sets = ", ".join(["state = ?", *(f"{name} = ?" for name in names)])
    marks = ", ".join("?" * from_states)
    return (
        f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({marks}) RETURNING {', '.join(COLUMNS)}"
    )


def _record(row: Sequence[Any]) -> JobRecord:
    """A job from its row (SELECT_JOB's columns)."""
    values = list(row)
    values[_STATE] = JobState(values[_STATE])
    values[_STOP] = tuple(json.loads(values[_STOP]))
    return JobRecord(*values)


class AsyncJobStore:
    """The store for the event loop, with group commit (the module's docstring). A
    write is queued when `insert` or `apply` is called, not when its result is
    awaited: the writes of two calls are committed in the order of the calls, in one
    batch or in consecutive ones. A read started after a write was answered sees it."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.reader = store.reader()
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")
        self._reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
        self._queued: list[tuple[Callable[[], object], asyncio.Future[Any]]] = []
        self._committing: asyncio.Task[None] | None = None
        self._closed = False

    async def _read(self, query: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reading, query, *args)

    def insert(self, record: JobRecord) -> asyncio.Future[tuple[JobRecord, bool]]:
        return self._write(functools.partial(self.store.insert, record))

    def apply(self, transitions: Sequence[Transition]) -> asyncio.Future[list[JobRecord | None]]:
        return self._write(functools.partial(self.store.apply, transitions))

    def _write(self, write: Callable[[], object]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        if self._closed:
            written.set_exception(StoreError("the job store is closed"))
            return written
        self._queued.append((write, written))
        if self._committing is None:
            # It starts at the loop's next turn: the writes made in this one join it.
            self._committing = loop.create_task(self._commit_queued())
        return written

    async def _commit_queued(self) -> None:
        """Commit the queued writes, a batch at a time, until none is left: the writes
        that arrive while one batch commits make the next."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[Callable[[], object], asyncio.Future[Any]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                try:
                    results = self.store.stage([write for write, _ in batch])
                    await loop.run_in_executor(self._committer, self.store.commit)
                except Exception as exc:
                    self.store.rollback()
                    for _, written in batch:
                        if not written.done():
                            written.set_exception(_failed(exc))
                    continue
                for (_, written), result in zip(batch, results, strict=True):
                    if written.done():  # its caller was cancelled; the write stands
                        continue
                    # No write returns an exception: one in its place is what it raised.
                    if isinstance(result, Exception):
                        written.set_exception(result)
                    else:
                        written.set_result(result)
        finally:
            self._committing = None
            # Cancelled (the loop is closing): nobody waits on an answer that won't come.
            for _, written in (*batch, *self._queued):
                written.cancel()

    async def by_request(self, tenant_id: str | None, request_id: str) -> JobRecord | None:
        return await self._read(self.reader.by_request, tenant_id, request_id)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._read(self.reader.get, job_id)

    async def active(self) -> list[JobRecord]:
        return await self._read(self.reader.active)

    async def list_jobs(
        self, states: Iterable[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        return await self._read(self.reader.list_jobs, states, tenant_id, limit, after_seq)

    async def tokens_since(self, since_ms: int) -> dict[str, int]:
        return await self._read(self.reader.tokens_since, since_ms)

    async def close(self) -> None:
        """Commit what is queued, then close; later writes fail with StoreError."""
        self._closed = True
        while self._committing is not None:
            await self._committing
        await self._read(self.reader.close)
        self._reading.shutdown(wait=True)
        self._committer.shutdown(wait=True)
        self.store.close()


def _failed(failure: Exception) -> StoreError:
    """What each writer of a batch that failed gets: an instance of its own, since each
    raises it with a traceback of its own."""
    if isinstance(failure, StoreError):
        error = StoreError(str(failure))
        error.__cause__ = failure.__cause__
    else:
        error = StoreError(f"the job store failed: {type(failure).__name__}: {failure}")
        error.__cause__ = failure
    return error
