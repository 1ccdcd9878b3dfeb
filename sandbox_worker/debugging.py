"""The step debugger's channel inside a diagnostics worker (issue 18).

Two threads meet here. The Schedule call's thread runs the script; when
lua/instrument.lua stops it, it calls `wait(event)`, which hands the event to the
Debug stream and blocks until the next command. The Debug call's thread turns
commands from the stream into `commands` and events from `events` into the stream.
Nothing here touches Lua but `wait`, on the Schedule thread that owns the runtime.

When the client goes away (its stream ends), the script is detached: it runs on to its
decision without stopping again, under the deadline of whoever called Schedule.
"""

from __future__ import annotations

import queue
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator._proto import sandbox_pb2

RESUME_MODES = {
    sandbox_pb2.Resume.CONTINUE: "continue",
    sandbox_pb2.Resume.NEXT: "next",
    sandbox_pb2.Resume.STEP_IN: "step_in",
    sandbox_pb2.Resume.STEP_OUT: "step_out",
}
# Breakpoints and conditions a client may set: bounded like every input.
MAX_BREAKPOINTS = 256
MAX_CONDITION_BYTES = 1024
_DETACH = object()  # the stream ended: run on without stopping
_CLOSED = object()  # the Schedule call ended: end the stream


class DebugChannel:
    def __init__(self, table_from: Callable[..., object], file: str) -> None:
        self._table_from = table_from  # makes a Lua table of a list, for commands
        self.file = file
        self.commands: queue.Queue[object] = queue.Queue()
        self.events: queue.Queue[object] = queue.Queue()
        self.detached = False

    # ------------------------------------------------------------ Schedule's thread
    def wait(self, event: Any) -> tuple[object, ...]:
        """Called by instrument.lua: send `event` (a Lua table), return the next command
        as Lua reads it: a name and its arguments.

        It never raises: lupa would hand the exception, a Python object, to the Lua
        state. What cannot be sent is answered as an error; what breaks detaches."""
        try:
            return self._exchange(event)
        except Exception as exc:
            traceback.print_exc()
            failure = f"the worker failed: {type(exc).__name__}"
            self.events.put(sandbox_pb2.DebugEvent(error=failure))
            self.detached = True
            return ("detach",)

    def _exchange(self, event: Any) -> tuple[object, ...]:
        self.events.put(_event(event, self.file))
        while True:
            if self.detached:
                return ("detach",)
            command = self.commands.get()
            if command is _DETACH:
                self.detached = True
                continue
            assert isinstance(command, sandbox_pb2.DebugCommand)
            decoded = self._decode(command)
            if decoded is not None:
                return decoded
            self.events.put(sandbox_pb2.DebugEvent(error="an empty command"))

    def close(self) -> None:
        """The script ended: the Debug stream ends after the events already sent."""
        self.events.put(_CLOSED)

    def _decode(self, command: sandbox_pb2.DebugCommand) -> tuple[object, ...] | None:
        which = command.WhichOneof("command")
        if which == "set_breakpoints":
            points = command.set_breakpoints.breakpoints[:MAX_BREAKPOINTS]
            return (
                "breakpoints",
                self._table_from([b.line for b in points]),
                self._table_from([b.condition[:MAX_CONDITION_BYTES] for b in points]),
            )
        if which == "resume":
            return ("resume", RESUME_MODES.get(command.resume.mode, "continue"))
        if which == "stack":
            return ("stack",)
        if which == "variables":
            v = command.variables
            return ("variables", v.reference, max(0, v.start), max(0, v.count))
        if which == "evaluate":
            e = command.evaluate
            return ("evaluate", e.frame, e.expression[:MAX_CONDITION_BYTES])
        return None

    # ------------------------------------------------------------ Debug's threads
    def pump(self, commands: Iterator[sandbox_pb2.DebugCommand]) -> None:
        """Read the client's commands until its stream ends, then detach the script."""
        try:
            for command in commands:
                self.commands.put(command)
        except Exception:  # the stream broke: the client is gone all the same
            pass
        self.commands.put(_DETACH)

    def stream(self, active: Callable[[], bool]) -> Iterator[sandbox_pb2.DebugEvent]:
        """The events for the client, until the script ends or the client goes."""
        while active():
            try:
                event = self.events.get(timeout=0.25)
            except queue.Empty:
                continue
            if event is _CLOSED:
                return
            assert isinstance(event, sandbox_pb2.DebugEvent)
            yield event


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _variable(v: Any) -> sandbox_pb2.Variable:
    return sandbox_pb2.Variable(
        name=_text(v["name"]),
        value=_text(v["value"]),
        type=_text(v["type"]),
        reference=int(v["reference"] or 0),
        indexed=int(v["indexed"] or 0),
        named=int(v["named"] or 0),
    )


def _event(event: Any, file: str) -> sandbox_pb2.DebugEvent:
    """An event table of instrument.lua as the message the client reads."""
    kind = str(event["kind"])
    if kind == "stopped":
        return sandbox_pb2.DebugEvent(
            stopped=sandbox_pb2.Stopped(reason=_text(event["reason"]), line=int(event["line"]))
        )
    if kind == "frames":
        frames = [
            sandbox_pb2.Frame(
                id=int(f["id"]),
                name=_text(f["name"]),
                line=int(f["line"] or 0),
                locals=int(f["locals"]),
                upvalues=int(f["upvalues"]),
            )
            for f in event["frames"].values()
        ]
        return sandbox_pb2.DebugEvent(
            frames=sandbox_pb2.Frames(frames=frames, file=file, globals=int(event["globals"]))
        )
    if kind == "variables":
        items = [_variable(v) for v in event["variables"].values()]
        return sandbox_pb2.DebugEvent(variables=sandbox_pb2.Variables(variables=items))
    if kind == "evaluated":
        return sandbox_pb2.DebugEvent(evaluated=_variable(event["variable"]))
    if kind == "breakpoints":
        conditions = list(event["conditions"].values())
        points = [
            sandbox_pb2.Breakpoint(line=int(line), condition=_text(conditions[i]))
            for i, line in enumerate(event["lines"].values())
        ]
        return sandbox_pb2.DebugEvent(breakpoints=sandbox_pb2.SetBreakpoints(breakpoints=points))
    return sandbox_pb2.DebugEvent(error=_text(event["message"]))
