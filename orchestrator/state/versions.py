"""Scheduler version history (docs/ARCHITECTURE.md, D14): every deployment, in SQLite.

Each entry keeps the source, its content hash, the semver from its header, who
deployed it, when, why, and the validation report; exactly one entry is active
when a user scheduler runs (none while the platform scheduler does).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    language TEXT NOT NULL,
    source TEXT NOT NULL,
    deployer TEXT NOT NULL,
    deployed_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    summary TEXT NOT NULL,
    report TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class Version:
    id: int
    sha256: str
    name: str
    version: str
    language: str
    source: str
    deployer: str
    deployed_at: int
    reason: str
    summary: str
    report: str
    active: bool


class VersionStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, entry: Version) -> Version:
        """Record a deployment and make it the active one."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("UPDATE versions SET active = 0")
            cursor = self.db.execute(
                "INSERT INTO versions (sha256, name, version, language, source, deployer,"
                " deployed_at, reason, summary, report, active)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (entry.sha256, entry.name, entry.version, entry.language, entry.source,
                 entry.deployer, entry.deployed_at, entry.reason, entry.summary, entry.report),
            )  # fmt: skip
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        found = self.get(int(cursor.lastrowid or 0))
        assert found is not None
        return found

    def deactivate(self) -> None:
        """The platform scheduler is in charge again."""
        self.db.execute("UPDATE versions SET active = 0")

    def get(self, version_id: int) -> Version | None:
        row = self.db.execute("SELECT * FROM versions WHERE id = ?", (version_id,)).fetchone()
        return _version(row) if row else None

    def active(self) -> Version | None:
        row = self.db.execute("SELECT * FROM versions WHERE active = 1").fetchone()
        return _version(row) if row else None

    def all(self) -> list[Version]:
        return [_version(r) for r in self.db.execute("SELECT * FROM versions ORDER BY id")]

    def before(self, version_id: int) -> Version | None:
        """The latest entry with other content deployed before `version_id`."""
        current = self.get(version_id)
        if current is None:
            return None
        row = self.db.execute(
            "SELECT * FROM versions WHERE id < ? AND sha256 != ? ORDER BY id DESC LIMIT 1",
            (version_id, current.sha256),
        ).fetchone()
        return _version(row) if row else None


def _version(row: tuple[Any, ...]) -> Version:
    (vid, sha, name, version, language, source, deployer, at, reason, summary, report, active) = row
    return Version(
        int(vid), str(sha), str(name), str(version), str(language), str(source), str(deployer),
        int(at), str(reason), str(summary), str(report), bool(active),
    )  # fmt: skip
