"""A sandbox worker started for diagnostics: trace, profile and the step debugger.

It is a sandbox worker like any other (the same spawn, hardening, rlimits and Lua heap
cap), started with `diagnostics` set, which is what lets it honour a request's
`instrument` and serve the Debug stream (sandbox_worker/server.py). Only this module
starts one; the production scheduling path (orchestrator/scheduling/) never does.

Each run starts from the whole context, sent as a snapshot: a diagnostic run is one
cycle, and a fresh snapshot keeps it independent of the calls before it. The snapshot
goes first, on its own (`hold`), as production resyncs a worker before the timed call:
what a run then measures, and what the debugger's deadline counts, is the script.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from orchestrator._proto import sandbox_pb2
from orchestrator.domain.context import Context
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.sandbox.process import SchedulerSpec, WorkerProcess
from orchestrator.scheduling.engine import platform_source
from orchestrator.wire import context as snapshot

# A call with no deadline (the debugger, which keeps its own clock) still ends, on the
# gRPC side, after a day: no call in this codebase waits forever.
NO_DEADLINE_S = 24 * 3600.0
# Applying a snapshot of a million jobs takes seconds; of the bank's 10,000, tens of ms.
HOLD_TIMEOUT_S = 60.0


class DiagnosticWorker:
    """One diagnostics sandbox worker running `source` (Lua) as `name`."""

    def __init__(
        self,
        source: str,
        name: str,
        *,
        language: str = "luajit",
        limits: SandboxLimits | None = None,
    ) -> None:
        self.spec = SchedulerSpec(
            name=name,
            source=source,
            platform_source=platform_source(),
            language=language,
            limits=limits or SandboxLimits(),
            diagnostics=True,
        )
        self._dir = Path(tempfile.mkdtemp(prefix="orch-diag-"))
        self.process = WorkerProcess(self.spec, self._dir, "d1")
        self._runs = 0

    async def __aenter__(self) -> DiagnosticWorker:
        try:
            await self.process.start()  # SchedulerLoadError when the script does not load
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def hold(self, ctx: Context) -> None:
        """Send `ctx` as a snapshot, without running the script: the next `run(None)`
        decides on it."""
        self._runs += 1
        request = sandbox_pb2.ScheduleRequest(
            epoch=self._runs, seq=1, snapshot=snapshot.to_proto(ctx), sync_only=True
        )
        await self.process.schedule(request, HOLD_TIMEOUT_S)

    async def run(
        self,
        ctx: Context | None,
        instrument: int = sandbox_pb2.INSTRUMENT_NONE,
        *,
        timeout_s: float | None = None,
    ) -> sandbox_pb2.ScheduleReply:
        """One schedule() call on `ctx` (None: the context `hold` sent), instrumented as
        asked; past `timeout_s` the call fails with DEADLINE_EXCEEDED (and the caller
        kills the worker, as production does)."""
        if ctx is not None:
            await self.hold(ctx)
        assert self._runs, "hold a context first"
        request = sandbox_pb2.ScheduleRequest(
            epoch=self._runs,
            base_seq=1,
            seq=1,
            instrument=instrument,  # type: ignore[arg-type]
        )
        return await self.process.schedule(
            request, timeout_s if timeout_s is not None else NO_DEADLINE_S
        )

    def debug_stream(self) -> Any:
        """The Debug call (grpc.aio stream-stream): write commands, read events."""
        assert self.process.stub is not None, "start the worker first"
        return self.process.stub.Debug()

    def kill(self) -> None:
        self.process.kill()
