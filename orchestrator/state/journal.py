"""The snapshot journal: the context cycle by cycle, as a chain of deltas.

Each cycle's context is diffed once against the previous one. A worker that holds
cycle M is brought to cycle N with the deltas M+1..N; one that is too far behind,
new, or confused gets the full snapshot. `snapshot_hash` chains the deltas, so it
names a cycle's state for the decision log at the cost of hashing what changed.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque

from orchestrator._proto import context_pb2, sandbox_pb2
from orchestrator.domain.context import Context
from orchestrator.wire.context import diff, to_proto


class SnapshotJournal:
    def __init__(self, max_deltas: int = 64) -> None:
        self.epoch = secrets.randbits(62) + 1
        self.seq = 0
        self.context: Context | None = None
        self.snapshot_hash = ""
        self._deltas: deque[tuple[int, context_pb2.ContextDelta]] = deque(maxlen=max_deltas)
        self._full: tuple[int, context_pb2.Context] | None = None

    def advance(self, ctx: Context) -> None:
        """Record the next cycle's context.

        Encoded before anything is recorded: a context that does not encode raises and
        leaves the journal as it was, so the chain of deltas never skips a cycle.
        """
        previous = self.context
        if previous is None:
            snapshot = to_proto(ctx)
            self.seq += 1
            self.context = ctx
            self._full = (self.seq, snapshot)
            data = snapshot.SerializeToString(deterministic=True)
            self.snapshot_hash = hashlib.sha256(data).hexdigest()
            return
        delta = diff(previous, ctx)
        self.seq += 1
        self.context = ctx
        self._deltas.append((self.seq, delta))
        data = delta.SerializeToString(deterministic=True)
        self.snapshot_hash = hashlib.sha256(self.snapshot_hash.encode() + data).hexdigest()

    def full_snapshot(self) -> context_pb2.Context:
        if self._full is None or self._full[0] != self.seq:
            assert self.context is not None, "advance() first"
            self._full = (self.seq, to_proto(self.context))
        return self._full[1]

    def deltas_since(self, epoch: int, seq: int) -> list[context_pb2.ContextDelta] | None:
        """The deltas from cycle `seq` to the current one; None when they are not kept."""
        if epoch != self.epoch or seq > self.seq:
            return None
        oldest = self._deltas[0][0] if self._deltas else self.seq + 1
        if seq != self.seq and not oldest <= seq + 1:
            return None
        return [d for s, d in self._deltas if s > seq]

    def request_for(self, worker_epoch: int, worker_seq: int) -> sandbox_pb2.ScheduleRequest:
        """What brings a worker holding (epoch, seq) to the current cycle."""
        request = sandbox_pb2.ScheduleRequest(epoch=self.epoch, seq=self.seq)
        deltas = self.deltas_since(worker_epoch, worker_seq)
        if deltas is None:
            request.snapshot.CopyFrom(self.full_snapshot())
        else:
            request.base_seq = worker_seq
            request.deltas.extend(deltas)
        return request
