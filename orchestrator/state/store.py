"""The durable job store: SQLite in WAL mode, one writer thread.

Every accepted job and every state change is committed before it is acknowledged.
Transitions (orchestrator/domain/transitions.py) are conditional (`from_states`), so
a job completes at most once even when a late worker reply races a retry. The
`transitions` table is the audit trail: one row per change, which is what
"completed exactly once" is checked on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.domain.errors import ConfigError
from orchestrator.domain.jobs import ACTIVE, JobRecord, JobState
from orchestrator.domain.transitions import Transition

T = TypeVar("T")

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


def _jobs_table(table: str) -> str:
    added = ",\n    ".join(f"{name} {kind}" for name, kind in ADDED_IN_3)
    return JOBS_TABLE.format(table=table, added=added)


class JobStore:
    """Synchronous SQLite access; use `AsyncJobStore` from the event loop."""

    def __init__(self, path: Path, *, durability: str = "full") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
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

    def close(self) -> None:
        self.db.close()

    def next_seq(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        return int(row[0]) + 1

    def by_request(self, tenant_id: str | None, request_id: str) -> JobRecord | None:
        """The job `tenant_id` (None or "": none) submitted with `request_id`, if any."""
        row = self.db.execute(
            "SELECT * FROM jobs WHERE COALESCE(tenant_id, '') = ? AND request_id = ?",
            (tenant_id or "", request_id),
        ).fetchone()
        return None if row is None else _record(row)

    def insert(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Store a new job; with a request_id its tenant used before, return the first
        job instead (False)."""
        if record.request_id is not None:
            existing = self.by_request(record.tenant_id, record.request_id)
            if existing is not None:
                return existing, False
        with self._transaction():
            record = dataclasses.replace(record, seq=self.next_seq())
            values = [_column(record, c) for c in COLUMNS]
            self.db.execute(
                f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                values,
            )
            self.db.execute(
                "INSERT INTO transitions VALUES (?, ?, ?, ?, ?)",
                (record.id, record.created_at, record.state, record.attempts, "submitted"),
            )
        return record, True

    def apply(self, transitions: Sequence[Transition]) -> list[JobRecord | None]:
        """Apply transitions in one transaction; None where a condition did not hold."""
        out: list[JobRecord | None] = []
        with self._transaction():
            for t in transitions:
                assignments = list(t.update.assignments())
                sets = ", ".join(["state = ?", *(f"{name} = ?" for name, _ in assignments)])
                marks = ", ".join("?" * len(t.from_states))
                cursor = self.db.execute(
                    f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({marks})",
                    (t.to_state, *(v for _, v in assignments), t.job_id, *t.from_states),
                )
                if cursor.rowcount == 0:
                    out.append(None)
                    continue
                row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (t.job_id,)).fetchone()
                self.db.execute(
                    "INSERT INTO transitions VALUES (?, ?, ?, ?, ?)",
                    (t.job_id, t.at, t.to_state, row["attempts"], t.detail),
                )
                out.append(_record(row))
        return out

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row is not None else None

    def active(self) -> list[JobRecord]:
        marks = ", ".join("?" * len(ACTIVE))
        rows = self.db.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", tuple(ACTIVE)
        ).fetchall()
        return [_record(r) for r in rows]

    def list_jobs(
        self, states: Iterable[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        query = "SELECT * FROM jobs WHERE seq > ?"
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

    def _transaction(self) -> _Tx:
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _column(record: JobRecord, name: str) -> object:
    value = getattr(record, name)
    return json.dumps(list(value)) if name == "stop" else value


def _record(row: sqlite3.Row) -> JobRecord:
    fields = {c: row[c] for c in COLUMNS}
    fields["state"] = JobState(fields["state"])
    fields["stop"] = tuple(json.loads(fields["stop"]))
    return JobRecord(**fields)


class AsyncJobStore:
    """The store for the event loop: every call runs on one dedicated thread, in order."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def insert(self, record: JobRecord) -> tuple[JobRecord, bool]:
        return await self.run(self.store.insert, record)

    async def by_request(self, tenant_id: str | None, request_id: str) -> JobRecord | None:
        return await self.run(self.store.by_request, tenant_id, request_id)

    async def apply(self, transitions: Sequence[Transition]) -> list[JobRecord | None]:
        return await self.run(self.store.apply, transitions)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.run(self.store.get, job_id)

    async def active(self) -> list[JobRecord]:
        return await self.run(self.store.active)

    async def list_jobs(
        self, states: Iterable[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        return await self.run(self.store.list_jobs, states, tenant_id, limit, after_seq)

    async def tokens_since(self, since_ms: int) -> dict[str, int]:
        return await self.run(self.store.tokens_since, since_ms)

    async def close(self) -> None:
        await self.run(self.store.close)
        self._thread.shutdown(wait=True)
