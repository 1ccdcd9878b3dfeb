"""The step debugger's DAP session: one client steps through one scheduling cycle.

`serve_one_session` listens, serves the first client that connects with a
`DebugSession` and returns when that session ends; another client meanwhile is closed
at once. The session speaks the Debug Adapter Protocol (framing: dap_protocol.py) to
the client, and drives the debuggee, a diagnostics sandbox worker with the scheduler
loaded, through a `DebugLink` (debug_link.py: the Debug RPC and the deadline).

The contract:
- `launch` or `attach` (the same: the CLI configured everything; their arguments are
  ignored but `stopOnEntry`) starts the cycle, which stops at the script's first line;
  the adapter answers, then sends `initialized`. Breakpoints are therefore set while
  stopped and verified by the worker (a condition that does not compile is refused
  with its error). `configurationDone` reports the entry stop (with `stopOnEntry`, or
  as a breakpoint's when one holds on that first line) or continues. Breakpoints set
  while the script runs are set at its next stop.
- Only the scheduler file (`source_path`) has breakpoints and frames; frames name it by
  its absolute path, so that an editor opens it.
- `continue`, `next`, `stepIn` and `stepOut` are answered before the worker resumes, so
  `stopped` always follows their response. `pause` is refused.
- When the cycle ends, an `output` event gives the script's logs and the decision,
  valid or not; `terminated` carries it (body: `decision`, `source`, `valid`); then
  `exited` (0 when the script's decision stands, 3 when production falls back, as in
  `scheduler test`). The decision is production's: see outcome.py.
- `disconnect` or `terminate`, or the client going away, kills the worker. Nothing the
  client sends, however malformed, raises out of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orchestrator._proto import sandbox_pb2
from orchestrator.debugging.dap_protocol import (
    INT64_MAX,
    MAX_HEADER_BYTES,
    BrokenStream,
    MalformedMessage,
    MessageWriter,
    RequestError,
    argument,
    integer,
    read_message,
    text,
)
from orchestrator.debugging.debug_link import CycleEnd, Debuggee, DebugLink
from orchestrator.debugging.outcome import Fallback, cycle_outcome
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context

THREAD_ID = 1  # one thread: the schedule() call
MAX_BREAKPOINTS = 256  # as many as the worker keeps
MAX_EXPRESSION_CHARS = 1024  # as long as the worker compiles
RESUME_MODES = {
    "continue": sandbox_pb2.Resume.CONTINUE,
    "next": sandbox_pb2.Resume.NEXT,
    "stepIn": sandbox_pb2.Resume.STEP_IN,
    "stepOut": sandbox_pb2.Resume.STEP_OUT,
}
FALSE = ("nil", "false")  # the short forms of Lua's false values
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class DebugSession:
    def __init__(
        self,
        debuggee: Debuggee,
        fallback: Fallback,
        ctx: Context,
        source_path: Path,
        *,
        deadline_ms: int,
        max_batch_actions: int,
        notice: str = "",
    ) -> None:
        self._fallback = fallback
        self._ctx = ctx
        self._source_path = source_path.resolve()
        self._deadline_ms = deadline_ms
        self._max_batch_actions = max_batch_actions
        self._notice = notice  # told once the cycle starts (for YAML: which Lua it is)
        self._link = DebugLink(
            debuggee, ctx, deadline_ms=deadline_ms, on_stop=self._stopped, on_end=self._ended
        )
        self._out: MessageWriter | None = None
        self._line_base = 1  # the client's first line number (initialize's linesStartAt1)
        self._stop_on_entry = False
        self._frames: sandbox_pb2.Frames | None = None  # of the current stop
        self._indexed: dict[int, int] = {}  # variables reference -> array items, this stop
        self._pending_breakpoints: list[sandbox_pb2.Breakpoint] | None = None
        self._breakpoints: list[sandbox_pb2.Breakpoint] = []  # as the worker has them
        self._entry_line = 0
        self._closing = False
        self._handlers: dict[str, Handler] = {
            "initialize": self._initialize,
            "launch": self._launch,
            "attach": self._launch,
            "setBreakpoints": self._set_breakpoints,
            "configurationDone": self._nothing,
            "threads": self._threads,
            "stackTrace": self._stack_trace,
            "scopes": self._scopes,
            "variables": self._variables,
            "evaluate": self._evaluate,
            **dict.fromkeys(RESUME_MODES, self._ready_to_resume),
            "pause": self._pause,
            "disconnect": self._end,
            "terminate": self._end,
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the client until it disconnects or its stream breaks."""
        out = self._out = MessageWriter(writer)
        try:
            while not self._closing:
                try:
                    request = await read_message(reader)
                except MalformedMessage as exc:
                    out.respond({"seq": exc.seq, "command": ""}, error=str(exc))
                    await out.drain()
                    continue
                except BrokenStream as exc:
                    out.event("output", {"category": "stderr", "output": f"closing: {exc}\n"})
                    break
                if request is None:
                    break
                await self._dispatch(out, request)
                await out.drain()
        finally:
            self._closing = True
            await self._link.close()
            await out.drain()

    async def _dispatch(self, out: MessageWriter, request: dict[str, Any]) -> None:
        command = request["command"]
        handler = self._handlers.get(command)
        if handler is None:
            out.respond(request, error=f"'{command}' is not supported")
            return
        try:
            body = await handler(request["arguments"])
        except RequestError as exc:
            out.respond(request, error=str(exc))
            return
        except (ValueError, OSError) as exc:  # a path with a NUL byte, say: the client's
            out.respond(request, error=f"bad arguments: {exc}")
            return
        out.respond(request, body)
        with contextlib.suppress(RequestError):  # the worker is gone: its end is reported
            await self._follow_up(out, command)

    async def _follow_up(self, out: MessageWriter, command: str) -> None:
        """What a request starts once it is answered, so that the client hears the
        response first."""
        if command in ("launch", "attach"):
            out.event("initialized")
        elif command in RESUME_MODES:
            await self._resume(RESUME_MODES[command])
        elif command == "configurationDone" and self._link.state == "stopped":
            if self._stop_on_entry:
                self._announce_stop("entry")
            elif await self._breakpoint_holds_at_entry():
                self._announce_stop("breakpoint")
            else:
                await self._resume(sandbox_pb2.Resume.CONTINUE)
        elif command == "disconnect":
            self._closing = True

    # ------------------------------------------------------------------ requests
    async def _initialize(self, args: dict[str, Any]) -> dict[str, Any]:
        self._line_base = 1 if argument(args, "linesStartAt1", bool, True) else 0
        return {
            "supportsConfigurationDoneRequest": True,
            "supportsConditionalBreakpoints": True,
            "supportsEvaluateForHovers": True,
            "supportsTerminateRequest": True,
        }

    async def _launch(self, args: dict[str, Any]) -> None:
        self._stop_on_entry = bool(argument(args, "stopOnEntry", bool, False))
        await self._start()

    async def _nothing(self, args: dict[str, Any]) -> None:
        return None

    async def _threads(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"threads": [{"id": THREAD_ID, "name": "schedule"}]}

    async def _pause(self, args: dict[str, Any]) -> None:
        raise RequestError(
            "pause is not supported: a scheduling cycle lasts milliseconds; set a breakpoint"
        )

    async def _end(self, args: dict[str, Any]) -> None:
        self._link.kill()

    async def _set_breakpoints(self, args: dict[str, Any]) -> dict[str, Any]:
        source = argument(args, "source", dict, {})
        path = argument(source, "path", str, "")
        wanted = argument(args, "breakpoints", list, [])
        if len(wanted) > MAX_BREAKPOINTS:
            raise RequestError(f"at most {MAX_BREAKPOINTS} breakpoints")
        points = [self._breakpoint(item) for item in wanted]
        if not path or os.path.realpath(path) != str(self._source_path):
            return self._shown(points, f"this session debugs {self._source_path} only")
        await self._start()  # a client that sets breakpoints before launching
        if self._link.state == "running":
            self._pending_breakpoints = points
            return self._shown(points, "set when the scheduler next stops")
        if self._link.state == "ended":
            return self._shown(points, "the cycle has ended")
        refused = await self._apply_breakpoints(points)
        return self._shown(points, "", refused)

    def _breakpoint(self, item: object) -> sandbox_pb2.Breakpoint:
        if not isinstance(item, dict):
            raise RequestError("each breakpoint must be an object")
        line = integer(item, "line") - self._line_base + 1
        condition = argument(item, "condition", str, "")
        if len(condition) > MAX_EXPRESSION_CHARS:
            raise RequestError(f"a condition is at most {MAX_EXPRESSION_CHARS} characters")
        return sandbox_pb2.Breakpoint(line=max(line, 0), condition=condition)

    def _shown(
        self,
        points: list[sandbox_pb2.Breakpoint],
        unset: str,
        refused: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        """The answer to setBreakpoints: each unverified with `unset` when it is not
        empty, else those in `refused` with their error, and the rest verified."""
        shown = []
        for i, point in enumerate(points):
            message = unset or (refused or {}).get(i, "")
            entry: dict[str, Any] = {"verified": not message, "line": self._client_line(point.line)}
            if message:
                entry["message"] = message
            shown.append(entry)
        return {"breakpoints": shown}

    async def _apply_breakpoints(self, points: list[sandbox_pb2.Breakpoint]) -> dict[int, str]:
        """Sets `points` in the stopped worker; the index and error of each refused one.
        The worker refuses a whole set for one condition that does not compile, naming
        its line: that breakpoint is left out and the rest set again."""
        refused: dict[int, str] = {}
        while True:
            kept = [p for i, p in enumerate(points) if i not in refused]
            answer = await self._link.ask(
                sandbox_pb2.DebugCommand(
                    set_breakpoints=sandbox_pb2.SetBreakpoints(breakpoints=kept)
                )
            )
            if answer.WhichOneof("event") != "error":
                self._breakpoints = kept
                return refused
            culprit = next(
                (i for i, p in enumerate(points) if i not in refused and p.condition
                 and answer.error.startswith(f"line {p.line}: ")),
                None,
            )  # fmt: skip
            if culprit is None:  # not a condition's fault: refuse them all
                return dict.fromkeys(range(len(points)), answer.error)
            refused[culprit] = answer.error

    async def _stack_trace(self, args: dict[str, Any]) -> dict[str, Any]:
        frames = await self._current_frames()
        first = integer(args, "startFrame", 0)
        levels = integer(args, "levels", 0) or len(frames.frames)
        source = {"name": self._source_path.name, "path": str(self._source_path)}
        shown = [
            {"id": f.id, "name": f.name, "line": self._client_line(f.line), "column": 1,
             "source": source}
            for f in frames.frames[first : first + levels]
        ]  # fmt: skip
        return {"stackFrames": shown, "totalFrames": len(frames.frames)}

    async def _scopes(self, args: dict[str, Any]) -> dict[str, Any]:
        frames = await self._current_frames()
        frame_id = integer(args, "frameId")
        frame = next((f for f in frames.frames if f.id == frame_id), None)
        if frame is None:
            raise RequestError(f"no frame {frame_id}")
        scopes = [("Locals", frame.locals, "locals"), ("Upvalues", frame.upvalues, ""),
                  ("Globals", frames.globals, "")]  # fmt: skip
        return {
            "scopes": [
                {"name": name, "variablesReference": ref, "expensive": False}
                | ({"presentationHint": hint} if hint else {})
                for name, ref, hint in scopes
                if ref
            ]
        }

    async def _variables(self, args: dict[str, Any]) -> dict[str, Any]:
        reference = integer(args, "variablesReference", high=INT64_MAX)
        start, count = integer(args, "start", 0), integer(args, "count", 0)
        which = argument(args, "filter", str, "")
        items = self._indexed.get(reference, 0)
        # The worker answers a page of array items and, for a page from the first item,
        # the named keys after them; a client that asks for one kind gets that kind.
        if which == "named":
            start, count = 0, 1
        answer = await self._link.ask(
            sandbox_pb2.DebugCommand(
                variables=sandbox_pb2.VariablesRequest(
                    reference=reference, start=start, count=count
                )
            )
        )
        if answer.WhichOneof("event") != "variables":
            raise RequestError(answer.error or "no variables")
        found = list(answer.variables.variables)
        if which == "named":
            found = found[min(items, 1) :]
        elif which == "indexed":
            found = found[: max(0, items - start)]
        return {"variables": [self._variable(v) for v in found]}

    async def _evaluate(self, args: dict[str, Any]) -> dict[str, Any]:
        expression = text(args, "expression", limit=MAX_EXPRESSION_CHARS)
        frame = integer(args, "frameId", 0)
        answer = await self._link.ask(
            sandbox_pb2.DebugCommand(
                evaluate=sandbox_pb2.EvaluateRequest(frame=frame, expression=expression)
            )
        )
        if answer.WhichOneof("event") != "evaluated":
            raise RequestError(answer.error or "the expression could not be evaluated")
        shown = self._variable(answer.evaluated)
        shown["result"] = shown.pop("value")
        del shown["name"]
        return shown

    async def _ready_to_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._link.state != "stopped":
            raise RequestError(f"the scheduler {self._link.describe_state()}")
        return {"allThreadsContinued": True}

    def _variable(self, v: sandbox_pb2.Variable) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "name": v.name, "value": v.value, "type": v.type, "variablesReference": v.reference
        }  # fmt: skip
        if v.indexed:
            shown["indexedVariables"] = v.indexed
            self._indexed[v.reference] = v.indexed
        if v.named:
            shown["namedVariables"] = v.named
        return shown

    def _client_line(self, line: int) -> int:
        return line - 1 + self._line_base

    async def _current_frames(self) -> sandbox_pb2.Frames:
        if self._frames is None:
            answer = await self._link.ask(
                sandbox_pb2.DebugCommand(stack=sandbox_pb2.StackRequest())
            )
            if answer.WhichOneof("event") != "frames":
                raise RequestError(answer.error or "no stack")
            self._frames = answer.frames
        return self._frames

    # ------------------------------------------------------------------ the cycle
    async def _start(self) -> None:
        if self._link.state != "idle":
            return
        await self._link.start()
        if self._notice and self._out is not None:
            self._out.event("output", {"category": "console", "output": self._notice + "\n"})

    async def _resume(self, mode: sandbox_pb2.Resume.Mode.ValueType) -> None:
        # References and frames are the worker's for one stop only.
        self._frames, self._indexed = None, {}
        await self._link.resume(mode)

    async def _breakpoint_holds_at_entry(self) -> bool:
        """A breakpoint on the line the script stopped at on entry: the worker will not
        stop there again, so the adapter checks it (its condition, if any, evaluated
        in the top frame: as the worker would, an error is false)."""
        for point in self._breakpoints:
            if point.line != self._entry_line:
                continue
            if not point.condition:
                return True
            answer = await self._link.ask(
                sandbox_pb2.DebugCommand(
                    evaluate=sandbox_pb2.EvaluateRequest(expression=point.condition)
                )
            )
            if answer.WhichOneof("event") == "evaluated" and answer.evaluated.value not in FALSE:
                return True
        return False

    async def _stopped(self, stopped: sandbox_pb2.Stopped) -> None:
        reason = stopped.reason
        if reason == "entry":
            self._entry_line = stopped.line
            return  # reported, or not, at configurationDone
        if self._pending_breakpoints is not None:
            points, self._pending_breakpoints = self._pending_breakpoints, None
            with contextlib.suppress(RequestError):  # gone: its end is reported instead
                await self._apply_breakpoints(points)
        self._announce_stop(reason)

    def _announce_stop(self, reason: str) -> None:
        if self._out is not None:
            self._out.event(
                "stopped", {"reason": reason, "threadId": THREAD_ID, "allThreadsStopped": True}
            )

    async def _ended(self, end: CycleEnd) -> None:
        out = self._out
        if self._closing or out is None:
            return  # disconnected: nobody to tell
        if end.killed_for == "client":  # `terminate`
            ended = "ended by the client before the scheduler decided\n"
            out.event("output", {"category": "console", "output": ended})
            out.event("terminated")
            await out.drain()
            return
        outcome = await cycle_outcome(
            end,
            self._ctx,
            self._fallback,
            deadline_ms=self._deadline_ms,
            max_batch_actions=self._max_batch_actions,
        )
        out.event("output", {"category": "console", "output": "\n".join(outcome.lines) + "\n"})
        out.event(
            "terminated",
            {
                "decision": decisions.to_dict(outcome.decision),
                "source": outcome.source,
                "valid": outcome.valid,
            },
        )
        out.event("exited", {"exitCode": 0 if outcome.valid else 3})
        await out.drain()


async def serve_one_session(
    host: str, port: int, session: DebugSession, listening: Callable[[str, int], None]
) -> None:
    """Listen on host:port, call `listening` with the bound address, serve the first
    client's session, and return when it ends. Any other client is turned away."""
    finished = asyncio.Event()
    taken = False

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal taken
        if taken:
            writer.close()
            return
        taken = True
        try:
            await session.serve(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            finished.set()

    server = await asyncio.start_server(client, host, port, limit=MAX_HEADER_BYTES)
    async with server:
        bound = server.sockets[0].getsockname()
        listening(bound[0], bound[1])
        await finished.wait()
