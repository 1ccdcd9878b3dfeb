"""SandboxService: the worker's gRPC face. Its handlers never raise.

Every failure of the script, or of ours, is encoded in the reply. The one status
code it sets is FAILED_PRECONDITION, for a delta that does not follow the state
the worker holds (docs/ARCHITECTURE.md, D1: the core then sends a full snapshot), and
for Debug on a worker not started for diagnostics.

A diagnostics worker (issue 18; never one of the production path) also honours a
request's `instrument` and serves Debug, the step debugger's channel
(sandbox_worker/debugging.py).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Iterator

import grpc

from orchestrator._proto import sandbox_pb2, sandbox_pb2_grpc
from sandbox_worker.debugging import DebugChannel
from sandbox_worker.runtime import LuaSchedulerRuntime

ErrorKind = sandbox_pb2.ErrorKind


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, hardening: list[str], *, diagnostics: bool = False) -> None:
        self.hardening = hardening
        self.diagnostics = diagnostics
        self._debug: DebugChannel | None = None  # the debugger's session, once opened
        self.runtime: LuaSchedulerRuntime | None = None
        self.epoch = 0
        self.seq = 0
        self.cycles = 0
        self.broken = ""  # set when the held context can no longer be trusted
        self._lock = threading.Lock()
        self._debug_lock = threading.Lock()

    def Load(
        self, request: sandbox_pb2.LoadRequest, context: grpc.ServicerContext
    ) -> sandbox_pb2.LoadReply:
        with self._lock:
            if self.runtime is not None and self.runtime.loaded:
                return _load_error("this worker already runs a scheduler; start a new worker")
            try:
                self.runtime = LuaSchedulerRuntime(request.language)
                return self.runtime.load(request)
            except Exception:
                return _load_error("internal error while loading", traceback.format_exc())

    def Schedule(
        self, request: sandbox_pb2.ScheduleRequest, context: grpc.ServicerContext
    ) -> sandbox_pb2.ScheduleReply:
        with self._lock:
            try:
                return self._schedule(request, context)
            except Exception:
                self.broken = "internal error"
                reply = sandbox_pb2.ScheduleReply(retire=True, seq=self.seq)
                reply.error.kind = ErrorKind.ERROR_KIND_INTERNAL
                reply.error.message = "internal error in the sandbox worker"
                reply.error.traceback = traceback.format_exc()
                return reply

    def _schedule(
        self, request: sandbox_pb2.ScheduleRequest, context: grpc.ServicerContext
    ) -> sandbox_pb2.ScheduleReply:
        runtime = self.runtime
        if runtime is None or not runtime.loaded:
            reply = sandbox_pb2.ScheduleReply()
            reply.error.kind = ErrorKind.ERROR_KIND_NOT_LOADED
            reply.error.message = "no scheduler is loaded"
            return reply
        started = time.perf_counter_ns()
        full = request.HasField("snapshot")
        if not full and (
            self.broken
            or request.epoch != self.epoch
            or request.base_seq != self.seq
            or request.seq != request.base_seq + len(request.deltas)
        ):
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details(
                f"worker holds epoch {self.epoch} seq {self.seq}"
                f"{' (' + self.broken + ')' if self.broken else ''}; "
                f"got epoch {request.epoch} base_seq {request.base_seq}: send a full snapshot"
            )
            return sandbox_pb2.ScheduleReply(seq=self.seq)
        self.broken = "applying an update"  # cleared once the update is fully applied
        if full:
            runtime.apply_snapshot(request.snapshot)
        else:
            for delta in request.deltas:
                runtime.apply_delta(delta)
        self.epoch, self.seq, self.broken = request.epoch, request.seq, ""
        applied = time.perf_counter_ns()
        reply = sandbox_pb2.ScheduleReply(
            seq=self.seq, apply_ns=applied - started, lua_memory_bytes=runtime.memory_used
        )
        if request.sync_only:
            return reply
        if request.instrument and not self.diagnostics:
            reply.error.kind = ErrorKind.ERROR_KIND_INTERNAL
            reply.error.message = (
                "this worker was not started for diagnostics: it does not trace, profile or debug"
            )
            return reply
        debugging = request.instrument == sandbox_pb2.INSTRUMENT_DEBUG
        debug = self._debug_channel() if debugging else None
        try:
            result = runtime.run(
                request.refresh_available,
                request.pool_state_fresh,
                instrument=request.instrument,
                debug_wait=debug.wait if debug is not None else None,
            )
        finally:
            if debug is not None:
                debug.close()
                with self._debug_lock:
                    self._debug = None  # the next debug call has a session of its own
        self.cycles += 1
        reply.run_ns = time.perf_counter_ns() - applied
        reply.lua_memory_bytes = runtime.memory_used
        reply.refresh_requested = result.refresh_requested
        reply.retire = result.retire
        reply.logs.extend(sandbox_pb2.LogRecord(level=lv, message=msg) for lv, msg in result.logs)
        reply.metrics.extend(sandbox_pb2.MetricSample(name=n, value=v) for n, v in result.metrics)
        reply.logs_dropped = result.logs_dropped
        reply.metrics_dropped = result.metrics_dropped
        if result.decision is not None and not result.error_kind:
            reply.decision.CopyFrom(result.decision)
        elif result.error_kind:
            reply.error.kind = result.error_kind  # type: ignore[assignment]
            reply.error.message = result.error_message
            reply.error.traceback = result.traceback
        if result.diagnostics is not None:
            reply.diagnostics.CopyFrom(result.diagnostics)
        return reply

    def _debug_channel(self) -> DebugChannel:
        """The session's channel: made by whichever of Debug and Schedule comes first."""
        with self._debug_lock:
            if self._debug is None:
                assert self.runtime is not None
                self._debug = DebugChannel(
                    self.runtime.lua.table_from, self.runtime.chunkname.removeprefix("=")
                )
            return self._debug

    def Debug(
        self, request_iterator: Iterator[sandbox_pb2.DebugCommand], context: grpc.ServicerContext
    ) -> Iterator[sandbox_pb2.DebugEvent]:
        if not self.diagnostics or self.runtime is None or not self.runtime.loaded:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "Debug needs a worker started for diagnostics, with its scheduler loaded",
            )
        channel = self._debug_channel()
        threading.Thread(
            target=channel.pump, args=(request_iterator,), name="debug-commands", daemon=True
        ).start()
        yield from channel.stream(context.is_active)

    def Health(
        self, request: sandbox_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> sandbox_pb2.HealthReply:
        runtime = self.runtime
        return sandbox_pb2.HealthReply(
            loaded=bool(runtime and runtime.loaded),
            source_sha256=runtime.source_sha256 if runtime else "",
            epoch=self.epoch,
            seq=self.seq,
            rss_bytes=_rss_bytes(),
            lua_memory_bytes=runtime.memory_used if runtime else 0,
            cycles=self.cycles,
            lua_version=runtime.lua_version if runtime else "",
            pid=os.getpid(),
            hardening=self.hardening,
        )

    def Echo(
        self, request: sandbox_pb2.EchoMessage, context: grpc.ServicerContext
    ) -> sandbox_pb2.EchoMessage:
        return request


def _load_error(message: str, tb: str = "") -> sandbox_pb2.LoadReply:
    reply = sandbox_pb2.LoadReply(ok=False)
    reply.error.kind = ErrorKind.ERROR_KIND_INTERNAL
    reply.error.message = message
    reply.error.traceback = tb
    return reply
