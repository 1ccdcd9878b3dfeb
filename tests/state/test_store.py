"""The job store: request ids unique per tenant, and the migration of older stores."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from orchestrator.domain.errors import ConfigError
from orchestrator.domain.jobs import JobRecord, JobState
from orchestrator.state.store import SCHEMA_VERSION, JobStore
from tests.fakes import record

# The jobs table and meta row as schema 1 (before request ids were per tenant) made them.
SCHEMA_1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, request_id TEXT UNIQUE, tenant_id TEXT,
    session_id TEXT, priority TEXT NOT NULL, model_ref TEXT NOT NULL, prompt TEXT NOT NULL,
    prompt_hash TEXT NOT NULL, max_tokens INTEGER NOT NULL, seed INTEGER,
    temperature REAL NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL, queued_at INTEGER NOT NULL, not_before INTEGER NOT NULL,
    dispatched_at INTEGER, finished_at INTEGER, worker_id TEXT, output TEXT NOT NULL,
    tokens_generated INTEGER NOT NULL, error TEXT NOT NULL,
    estimated_vram_bytes INTEGER NOT NULL, estimated_duration_ms INTEGER NOT NULL
);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_tenant_finished ON jobs(tenant_id, finished_at);
CREATE TABLE transitions (
    job_id TEXT NOT NULL, at INTEGER NOT NULL, state TEXT NOT NULL,
    attempt INTEGER NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX transitions_job ON transitions(job_id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO jobs VALUES ('job-a', 1, 'req-1', 'acme', NULL, 'batch', 'llama-8b', 'p',
    'sha256:0', 8, NULL, 0.0, 'completed', 1, 1, 1, 0, 2, 3, 'w1', 'out', 5, '', 0, 0);
INSERT INTO jobs VALUES ('job-n', 2, 'req-2', NULL, NULL, 'batch', 'llama-8b', 'p',
    'sha256:0', 8, NULL, 0.0, 'queued', 0, 1, 1, 0, NULL, NULL, NULL, '', 0, '', 0, 0);
INSERT INTO transitions VALUES ('job-a', 1, 'queued', 0, 'submitted');
"""
# Schema 2, as it was before issue 15 added columns: request ids unique per tenant (by
# an index), and a job in flight.
SCHEMA_2 = (
    SCHEMA_1.replace("request_id TEXT UNIQUE", "request_id TEXT").replace(
        "('schema_version', '1')", "('schema_version', '2')"
    )
    + """
CREATE UNIQUE INDEX jobs_request ON jobs(COALESCE(tenant_id, ''), request_id);
INSERT INTO jobs VALUES ('job-r', 3, NULL, 'acme', NULL, 'batch', 'llama-8b', 'p',
    'sha256:0', 8, 7, 0.5, 'running', 1, 1, 1, 0, 2, NULL, 'w1', '', 0, '', 0, 0);
"""
)


DEFAULTS_3 = ("", (), 1.0, 0, None, "")  # what a row from before schema 3 gets


def added_in_3(r: JobRecord) -> tuple[object, ...]:
    return (r.messages, r.stop, r.top_p, r.prompt_tokens, r.first_token_at, r.finish_reason)


def of(tenant: str | None, job_id: str, request_id: str) -> JobRecord:
    return dataclasses.replace(record(job_id), tenant_id=tenant, request_id=request_id)


def test_request_id_is_unique_per_tenant(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store.insert(of("acme", "job-1", "req-1"))[1]
    theirs, created = store.insert(of("mallory", "job-2", "req-1"))
    assert created and theirs.id == "job-2"  # not acme's job
    again, created = store.insert(of("acme", "job-3", "req-1"))
    assert not created and again.id == "job-1"
    plain, created = store.insert(of(None, "job-4", "req-1"))
    assert created  # no tenant is a tenant of its own ("")
    assert store.insert(of(None, "job-5", "req-1")) == (plain, False)
    assert store.insert(of("", "job-6", "req-1")) == (plain, False)  # "" is no tenant
    with pytest.raises(sqlite3.IntegrityError):  # the schema holds it, not only insert()
        store.db.execute("UPDATE jobs SET tenant_id = 'acme' WHERE id = 'job-2'")


def migrated(path: Path, schema: str) -> JobStore:
    """A store written by an older version (`schema`), opened by this one."""
    old = sqlite3.connect(path)
    old.executescript(schema)
    old.close()
    store = JobStore(path)
    version = store.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version[0] == SCHEMA_VERSION == "3"
    return store


def test_a_schema_1_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = migrated(path, SCHEMA_1)
    (sql,) = store.db.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()
    assert "UNIQUE" not in sql and "first_token_at" in sql
    indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"jobs_state", "jobs_tenant_finished", "jobs_request"} <= indexes
    a, n = store.get("job-a"), store.get("job-n")  # every row and column kept
    assert a is not None and (a.tenant_id, a.request_id, a.output, a.tokens_generated) == (
        "acme", "req-1", "out", 5,
    )  # fmt: skip
    assert added_in_3(a) == DEFAULTS_3
    assert n is not None and n.tenant_id is None and [r.id for r in store.active()] == ["job-n"]
    assert store.transitions("job-a") == [(1, "queued", 0, "submitted")]
    assert store.insert(of("acme", "job-x", "req-1"))[0].id == "job-a"
    assert store.insert(of("globex", "job-y", "req-1"))[1]  # per tenant now
    assert store.next_seq() == 4
    store.close()
    JobStore(path).close()  # opening a migrated store again changes nothing


def test_a_schema_2_store_gets_the_new_columns_with_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = migrated(path, SCHEMA_2)
    a, r = store.get("job-a"), store.get("job-r")  # every row and column kept
    assert a is not None and (a.state, a.request_id, a.output, a.tokens_generated) == (
        JobState.COMPLETED, "req-1", "out", 5,
    )  # fmt: skip
    assert r is not None and (r.seed, r.temperature, r.worker_id) == (7, 0.5, "w1")
    for row in (a, r):
        assert added_in_3(row) == DEFAULTS_3
        assert row.ttft_ms is None and row.tpot_ms is None
    assert [j.id for j in store.active()] == ["job-n", "job-r"]
    assert store.transitions("job-a") == [(1, "queued", 0, "submitted")]
    assert store.insert(of("acme", "job-x", "req-1"))[0].id == "job-a"  # its index stands
    chat = dataclasses.replace(
        record("job-c"), messages='[{"role": "user", "content": "hi"}]', stop=("\n", "END"),
        top_p=0.9,
    )  # fmt: skip
    store.insert(chat)
    assert store.get("job-c") == dataclasses.replace(chat, seq=4)
    store.close()
    JobStore(path).close()  # opening a migrated store again changes nothing


def test_a_store_of_an_unknown_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    newer = JobStore(path)
    newer.db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    newer.close()
    with pytest.raises(ConfigError, match="schema 4 is not 3"):
        JobStore(path)


def test_list_jobs_of_the_empty_tenant_are_those_without_one(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert(of("acme", "job-1", "r1"))
    store.insert(of(None, "job-2", "r2"))
    assert [r.id for r in store.list_jobs([], "", 10, 0)] == ["job-2"]
    assert [r.id for r in store.list_jobs([], "acme", 10, 0)] == ["job-1"]
    assert [r.id for r in store.list_jobs([], None, 10, 0)] == ["job-1", "job-2"]
