"""The decision log: each scheduling cycle's context and executed decision, on disk.

Files live in `state_dir/decisions/`. Each is a sequence of varint-length-prefixed
`DecisionLogEntry` messages (protobuf's delimited format); the first entry of a file
holds a full snapshot and the rest hold the journal's deltas, so a cycle costs what
changed. Files rotate by size and the oldest are deleted. `read_log` turns a file
back into contexts for `orchestratord scheduler replay`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog
from google.protobuf.message import DecodeError

from orchestrator._proto import decision_log_pb2
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context
from orchestrator.domain.errors import ConfigError
from orchestrator.state.journal import SnapshotJournal
from orchestrator.support.files import open_log
from orchestrator.wire import context as snapshot
from orchestrator.wire import decision as decision_codec


class CycleFailure(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def message(self) -> str: ...


class RecordedCycle(Protocol):
    """What the log keeps of a cycle: the engine's CycleResult is one. Declared here
    so that the log, below the engine, needs nothing from it."""

    @property
    def decision(self) -> decisions.Decision: ...
    @property
    def source(self) -> str: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def snapshot_hash(self) -> str: ...
    @property
    def error(self) -> CycleFailure | None: ...


log = structlog.get_logger("orchestrator.decision_log")

SUFFIX = ".log"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


class DecisionLog:
    """Appends one entry per cycle; never raises into the scheduling loop."""

    def __init__(self, directory: Path, *, max_file_bytes: int, keep_files: int) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self.keep_files = max(1, keep_files)
        self.path: Path | None = None
        self.errors = 0
        self._file: BinaryIO | None = None
        self._size = 0
        self._epoch = 0
        self._seq = 0

    def record(
        self,
        result: RecordedCycle,
        journal: SnapshotJournal,
        scheduler: str,
        scheduler_sha256: str,
    ) -> None:
        """Append `result`; `scheduler` names the active scheduler and `scheduler_sha256`
        is the sha256 of the Lua it runs ("" when the platform scheduler is in charge)."""
        try:
            self._record(result, journal, scheduler, scheduler_sha256)
        except OSError as exc:
            self.errors += 1
            self.close()
            if self.errors == 1 or self.errors % 1000 == 0:
                log.error("decision_log.write_failed", error=str(exc), errors=self.errors)

    def _record(
        self, result: RecordedCycle, journal: SnapshotJournal, scheduler: str, scheduler_sha256: str
    ) -> None:
        entry = decision_log_pb2.DecisionLogEntry(
            epoch=journal.epoch,
            seq=journal.seq,
            source=result.source,
            latency_ms=result.latency_ms,
            snapshot_hash=result.snapshot_hash,
            scheduler=scheduler,
            wall_ms=int(time.time() * 1000),
            scheduler_sha256=scheduler_sha256,
        )
        entry.decision.CopyFrom(decision_codec.to_proto(result.decision))
        if result.error is not None:
            entry.error_kind = result.error.kind
            entry.error_message = result.error.message[:2000]
        if self._file is None or self._size >= self.max_file_bytes:
            self._rotate()
        deltas = journal.deltas_since(self._epoch, self._seq) if self._size else None
        if deltas is None:
            entry.snapshot.CopyFrom(journal.full_snapshot())
        else:
            entry.deltas.extend(deltas)
        data = entry.SerializeToString()
        assert self._file is not None
        self._file.write(_varint(len(data)) + data)
        self._file.flush()  # a crash loses at most the cycle being written
        self._size += len(data)
        self._epoch, self._seq = journal.epoch, journal.seq

    def _rotate(self) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.directory / f"decisions-{stamp}-{time.monotonic_ns() % 10**6:06d}{SUFFIX}"
        # Never through a link; group-readable, so that operators in the service's group
        # can replay it (under the unit's UMask=0027, as before it was opened safely).
        self._file = os.fdopen(open_log(path, append=True, mode=0o640), "ab")
        self.path, self._size = path, 0
        for old in sorted(self.directory.glob(f"decisions-*{SUFFIX}"))[: -self.keep_files]:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._size = None, 0


@dataclass(frozen=True)
class LoggedCycle:
    seq: int
    context: Context
    decision: decisions.Decision
    source: str
    error_kind: str
    latency_ms: float
    wall_ms: int
    scheduler: str
    # Why the user's scheduler did not decide, when it did not (truncated to 2000 chars).
    error_message: str = ""
    # The sha256 of the Lua the active scheduler ran; "" for the platform scheduler
    # and in logs written before it was recorded.
    scheduler_sha256: str = ""


def log_files(path: Path) -> list[Path]:
    """A log file, or every log file of a directory, oldest first."""
    if path.is_dir():
        files = sorted(path.glob(f"decisions-*{SUFFIX}"))
        if not files:
            raise ConfigError(f"{path}: no decision log files (decisions-*{SUFFIX}) here")
        return files
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    return [path]


def read_log(path: Path) -> Iterator[LoggedCycle]:
    """The cycles of one log file, contexts rebuilt. A torn last entry (a crash while
    writing) ends the file quietly; anything else malformed is a ConfigError."""
    data = path.read_bytes()
    offset = 0
    ctx: Context | None = None
    while offset < len(data):
        length, shift, start = 0, 0, offset
        while True:
            if offset >= len(data):
                return
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                raise ConfigError(f"{path}: bad entry length at byte {start}")
        if offset + length > len(data):
            return
        entry = decision_log_pb2.DecisionLogEntry()
        try:
            entry.ParseFromString(data[offset : offset + length])
        except DecodeError as exc:
            raise ConfigError(
                f"{path}: entry at byte {start} is not a decision log entry ({exc})"
            ) from None
        offset += length
        if entry.HasField("snapshot"):
            ctx = snapshot.from_proto(entry.snapshot)
        elif ctx is None:
            raise ConfigError(f"{path}: the first entry holds no snapshot; not a log file start")
        else:
            for delta in entry.deltas:
                ctx = snapshot.apply_delta(ctx, delta)
        yield LoggedCycle(
            seq=entry.seq,
            context=ctx,
            decision=decision_codec.from_proto(entry.decision),
            source=entry.source,
            error_kind=entry.error_kind,
            latency_ms=entry.latency_ms,
            wall_ms=entry.wall_ms,
            scheduler=entry.scheduler,
            error_message=entry.error_message,
            scheduler_sha256=entry.scheduler_sha256,
        )
