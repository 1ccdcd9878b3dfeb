"""The adapter's end of the Debug RPC: one cycle of a diagnostics worker, commanded
while stopped and timed while running.

The contract:
- `start()` opens the Debug stream, then calls Schedule with INSTRUMENT_DEBUG (the
  worker pairs them in either order), and returns once the script has stopped at its
  first line, or the call has ended.
- `ask(command)` sends one command to the stopped worker and returns its one answer;
  commands are sent one at a time, so answers are matched by order. A worker that
  does not answer, or has gone, is a RequestError.
- `resume(mode)` sends Resume; no answer comes: the next event is a stop, or the end.
- Every stop is handed to `on_stop(stopped)`, in a task of its own (it may `ask`).
  When the Schedule call returns or fails, `on_end(CycleEnd)` is awaited once.
- The clock counts running time only: from the Schedule call (the context already
  held by the worker) to the first stop, then
  from each resume to the next stop. Past the budget the worker is killed
  (`CycleEnd.killed_for == "deadline"`), as production kills a worker past its
  deadline. `kill()` ends the cycle at the client's wish (`"client"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from grpc import aio

from orchestrator._proto import sandbox_pb2
from orchestrator.debugging.dap_protocol import RequestError
from orchestrator.domain.context import Context
from orchestrator.support.tasks import cancel_and_wait

# A stopped worker answers in microseconds; past this it is wedged.
ANSWER_TIMEOUT_S = 10.0


class DebugStream(Protocol):
    """The client end of the Debug RPC (a grpc.aio stream-stream call)."""

    async def write(self, request: sandbox_pb2.DebugCommand) -> None: ...

    async def read(self) -> Any: ...  # a DebugEvent, or grpc.aio.EOF

    def cancel(self) -> bool: ...


class Debuggee(Protocol):
    """A diagnostics sandbox worker with the scheduler loaded (debugging/worker.py)."""

    async def hold(self, ctx: Context) -> None: ...

    async def run(
        self, ctx: Context | None, instrument: int = ..., *, timeout_s: float | None = None
    ) -> sandbox_pb2.ScheduleReply: ...

    def debug_stream(self) -> DebugStream: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class CycleEnd:
    reply: sandbox_pb2.ScheduleReply | None  # None: the call failed
    failure: str  # why the call failed
    killed_for: str  # "", "deadline", "client" or "unresponsive"


class RunningClock:
    """The script's running time: the sum of the intervals between start() and stop()."""

    def __init__(self, budget_s: float, now: Callable[[], float] = time.perf_counter) -> None:
        self.budget_s = budget_s
        self._now = now
        self._spent = 0.0
        self._since: float | None = None

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self._spent += self._now() - self._since
            self._since = None

    def remaining_s(self) -> float:
        running = 0.0 if self._since is None else self._now() - self._since
        return self.budget_s - self._spent - running


class DebugLink:
    def __init__(
        self,
        debuggee: Debuggee,
        ctx: Context,
        *,
        deadline_ms: int,
        on_stop: Callable[[sandbox_pb2.Stopped], Awaitable[None]],
        on_end: Callable[[CycleEnd], Awaitable[None]],
    ) -> None:
        self._debuggee = debuggee
        self._ctx = ctx
        self._clock = RunningClock(deadline_ms / 1000)
        self._on_stop = on_stop
        self._on_end = on_end
        self.state = "idle"  # idle, running, stopped, ended
        self._stream: DebugStream | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: asyncio.Queue[sandbox_pb2.DebugEvent] = asyncio.Queue()
        self._asking = asyncio.Lock()  # one command in flight: answers come in order
        self._halted = asyncio.Event()  # set while stopped, and once the cycle has ended
        self._ended = asyncio.Event()
        self._killed_for = ""

    async def start(self) -> None:
        # The context first, off the clock: production resyncs a worker before the
        # timed call, and a 10,000-job snapshot alone takes tens of milliseconds.
        await self._debuggee.hold(self._ctx)
        self._stream = self._debuggee.debug_stream()
        self.state = "running"
        self._clock.start()
        self._spawn(self._read_events(self._stream))
        self._spawn(self._run())
        self._spawn(self._watch_deadline())
        await self._halted.wait()

    async def ask(self, command: sandbox_pb2.DebugCommand) -> sandbox_pb2.DebugEvent:
        async with self._asking:
            if self.state != "stopped":
                raise RequestError(f"the scheduler {self.describe_state()}")
            await self._write(command)
            answer = asyncio.ensure_future(self._answers.get())
            ended = asyncio.ensure_future(self._ended.wait())
            done, _ = await asyncio.wait(
                (answer, ended), timeout=ANSWER_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            ended.cancel()
            if answer in done:
                return answer.result()
            answer.cancel()
            # Answers are matched by order: a late one would answer the next question.
            # A worker that does not answer is wedged; the cycle ends as production's would.
            self._killed_for = self._killed_for or "unresponsive"
            self._debuggee.kill()
            raise RequestError("the sandbox worker did not answer; it was stopped")

    async def resume(self, mode: sandbox_pb2.Resume.Mode.ValueType) -> None:
        if self.state != "stopped":
            return
        self.state = "running"
        self._halted.clear()
        self._clock.start()
        self._spawn(self._watch_deadline())
        with contextlib.suppress(RequestError):  # the worker is gone: its end says how
            await self._write(sandbox_pb2.DebugCommand(resume=sandbox_pb2.Resume(mode=mode)))

    def describe_state(self) -> str:
        return {"idle": "has not started", "running": "is running", "stopped": "is stopped",
                "ended": "has ended"}[self.state]  # fmt: skip

    def kill(self) -> None:
        """End the cycle now, at the client's wish."""
        if self.state in ("running", "stopped"):
            self._killed_for = self._killed_for or "client"
            self._debuggee.kill()

    async def close(self) -> None:
        """Kill a cycle still going; wait (bounded) for its end to be handled."""
        self.kill()
        if self._tasks:  # a killed call ends at once; its report may take a little longer
            await asyncio.wait(set(self._tasks), timeout=ANSWER_TIMEOUT_S)
        if self._stream is not None:
            self._stream.cancel()
        for task in set(self._tasks):
            await cancel_and_wait(task)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, command: sandbox_pb2.DebugCommand) -> None:
        assert self._stream is not None
        try:
            await self._stream.write(command)
        except (aio.AioRpcError, asyncio.InvalidStateError):  # the call is over
            raise RequestError("the sandbox worker is gone") from None

    async def _watch_deadline(self) -> None:
        try:
            await asyncio.wait_for(self._halted.wait(), max(self._clock.remaining_s(), 0))
        except TimeoutError:
            self._killed_for = "deadline"
            self._debuggee.kill()

    async def _read_events(self, stream: DebugStream) -> None:
        while True:
            try:
                event = await stream.read()
            except asyncio.CancelledError:
                # A killed worker's channel cancels its calls: that is not aimed at us.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                return
            except Exception:  # the worker was killed or crashed: the cycle's end says how
                return
            if event is aio.EOF:
                return
            if event.WhichOneof("event") != "stopped":
                self._answers.put_nowait(event)
                continue
            self._clock.stop()
            self.state = "stopped"
            self._halted.set()
            # Not from this task: on_stop may ask, and the answer comes through here.
            self._spawn(self._on_stop(event.stopped))

    async def _run(self) -> None:
        reply: sandbox_pb2.ScheduleReply | None = None
        failure = ""
        try:
            reply = await self._debuggee.run(None, sandbox_pb2.INSTRUMENT_DEBUG)
        except Exception as exc:  # killed (deadline, client) or crashed
            failure = str(exc) or type(exc).__name__
        finally:
            self._clock.stop()
            self.state = "ended"
            self._halted.set()
            self._ended.set()
        await self._on_end(CycleEnd(reply, failure, self._killed_for))
