"""lua/instrument.lua through the worker's real runtime: trace, profile and the debugger's
stops, on both Lua runtimes; and that a worker not started for diagnostics does none of it."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import grpc
import pytest
from grpc import aio

from orchestrator._proto import sandbox_pb2 as pb
from orchestrator.debugging.worker import DiagnosticWorker
from orchestrator.domain.samples import sample_context
from orchestrator.sandbox.process import SchedulerSpec, WorkerProcess
from orchestrator.scheduling.engine import platform_source
from orchestrator.wire import context as snapshot
from sandbox_worker.debugging import DebugChannel
from sandbox_worker.runtime import MAX_TRACE_STEPS, RunResult
from tests.conftest import InProcessRuntime
from tests.security.corpus import CASES

# The sample context queues five jobs and runs four workers.
SCRIPT = """local seen = 0
local function idle(w) return w.status == "idle" end
function schedule(ctx)
  local q = ctx.queue
  for i, job in ipairs(q) do
    seen = seen + 1
  end
  local ready = ctx.filter_workers(idle)
  local first = ctx.get_job(q[1].id)
  if #q == 0 then return { action = "wait" } end
  return ctx.platform_schedule(ctx)
end
"""


def _run(lua: InProcessRuntime, source: str, instrument: int) -> RunResult:
    reply = lua.load(source)
    assert reply.ok, reply.error.message
    assert lua.runtime is not None
    lua.runtime.apply_snapshot(snapshot.to_proto(sample_context()))
    return lua.runtime.run(False, False, instrument=instrument)


def _counts(result: RunResult) -> dict[int, int]:
    assert result.diagnostics is not None
    return {line.line: line.count for line in result.diagnostics.lines}


def test_trace_counts_lines_and_records_the_built_ins_the_script_calls(
    lua: InProcessRuntime,
) -> None:
    result = _run(lua, SCRIPT, pb.INSTRUMENT_TRACE)
    assert result.error_kind == 0, result.error_message
    assert result.decision is not None and result.decision.WhichOneof("action") == "batch"
    counts = _counts(result)
    assert counts[4] == 1  # local q = ctx.queue
    assert counts[5] == 6  # the loop's head: five jobs, and the end
    assert counts[6] == 5
    assert counts[2] == 4  # the predicate, once per worker, though a built-in calls it
    assert counts[11] == 1 and 10 in counts and 12 not in counts
    d = result.diagnostics
    assert d is not None and d.file == "test.lua" and d.steps_dropped == 0
    # Steps are the order lines ran in: the loop alternates its head and body.
    order = [d.lines[i].line for i in d.steps]
    assert order[:4] == [4, 5, 6, 5] and order[-1] == 11
    assert [c.name for c in d.calls] == ["filter_workers", "get_job", "platform_schedule"]
    get_job = d.calls[1]
    assert get_job.args == '"job-1"' and get_job.line == 9
    assert get_job.result == "job job-1 (interactive, llama-8b)" and not get_job.raised
    assert d.calls[0].args == "function" and d.calls[0].line == 8
    # What platform_schedule called on its own is not the script's call.
    assert d.calls[2].result.startswith('{action="batch"')


def test_profile_times_lines_functions_and_built_ins(lua: InProcessRuntime) -> None:
    result = _run(lua, SCRIPT, pb.INSTRUMENT_PROFILE)
    d = result.diagnostics
    assert d is not None
    assert _counts(result) == _counts(_run(lua, SCRIPT, pb.INSTRUMENT_TRACE))
    assert all(line.self_ms >= 0 for line in d.lines)
    functions = {f.name: f for f in d.functions}
    assert functions["schedule"].calls == 1 and functions["schedule"].line == 3
    assert functions["function at line 2"].calls == 4
    assert functions["ctx.filter_workers"].calls == 1
    assert functions["ctx.platform_schedule"].line == 0
    assert d.clock_ms >= sum(line.self_ms for line in d.lines) * 0.5


def test_a_line_that_reads_ctx_counts_once_on_both_runtimes(lua: InProcessRuntime) -> None:
    """LuaJIT reports a line again after a metamethod of ctx ran in it; that is not a
    second run of the line."""
    source = """function schedule(ctx)
  local n = #ctx.queue + #ctx.pools
  local p = ctx.queue[1].priority .. ctx.queue[2].priority
  local w = ctx.find_workers_by_model("llama-8b")
  return { action = "wait" }
end
"""
    assert _counts(_run(lua, source, pb.INSTRUMENT_TRACE)) == {2: 1, 3: 1, 4: 1, 5: 1}


def test_a_trace_is_bounded_but_every_line_is_counted(lua: InProcessRuntime) -> None:
    source = """function schedule(ctx)
  local n = 0
  for i = 1, 30000 do
    n = n + i
  end
  return { action = "wait", reason = tostring(n) }
end
"""
    result = _run(lua, source, pb.INSTRUMENT_TRACE)
    d = result.diagnostics
    assert d is not None
    assert len(d.steps) == MAX_TRACE_STEPS and d.steps_dropped > 0
    assert _counts(result)[4] == 30000


def test_a_loop_compiled_by_a_plain_run_is_still_traced(lua: InProcessRuntime) -> None:
    """LuaJIT's compiled code runs no hook: an instrumented call turns the compiler off."""
    source = """function schedule(ctx)
  local n = 0
  for i = 1, 5000 do
    n = n + i
  end
  return { action = "wait", reason = tostring(n) }
end
"""
    _run(lua, source, pb.INSTRUMENT_NONE)
    assert lua.runtime is not None
    lua.runtime.run(False, False)  # the loop is hot: LuaJIT has compiled it
    result = lua.runtime.run(False, False, instrument=pb.INSTRUMENT_TRACE)
    assert _counts(result)[4] == 5000


def test_a_failing_script_still_returns_its_trace(lua: InProcessRuntime) -> None:
    source = 'function schedule(ctx)\n  local j = ctx.get_job("job-1")\n  error("boom")\nend\n'
    result = _run(lua, source, pb.INSTRUMENT_TRACE)
    assert result.error_kind == pb.ERROR_KIND_LUA_ERROR and "boom" in result.error_message
    assert _counts(result) == {2: 1, 3: 1}


@pytest.mark.parametrize(
    "call",
    [
        "ctx.get_job(42)",  # raised at the built-in's own level
        'ctx.emit_metric("m", 0/0)',  # raised at the script's: the pcall must not hide it
        'ctx.filter_workers(function(w) error("inside") end)',
    ],
)
def test_errors_read_the_same_traced_or_not(lua: InProcessRuntime, call: str) -> None:
    """A built-in's error, or a predicate's, reads the same traced or not."""
    source = f"function schedule(ctx)\n  local x = {call}\n  return {{ action = 'wait' }}\nend\n"
    plain = _run(lua, source, pb.INSTRUMENT_NONE)
    traced = _run(lua, source, pb.INSTRUMENT_TRACE)
    assert plain.error_kind == traced.error_kind == pb.ERROR_KIND_LUA_ERROR
    assert traced.error_message == plain.error_message


def test_a_plain_run_after_a_traced_one_carries_nothing(lua: InProcessRuntime) -> None:
    _run(lua, SCRIPT, pb.INSTRUMENT_TRACE)
    assert lua.runtime is not None
    plain = lua.runtime.run(False, False)
    assert plain.diagnostics is None and plain.decision is not None


@pytest.mark.parametrize(
    "instrument", [pb.INSTRUMENT_TRACE, pb.INSTRUMENT_PROFILE, pb.INSTRUMENT_DEBUG]
)
def test_the_escape_corpus_still_fails_under_instrumentation(
    lua: InProcessRuntime, instrument: int, tmp_path: Path
) -> None:
    """Instrumenting hands scripts wrappers and runs a hook; debugging also holds a
    Python function in the state (here with no client: the script runs detached).
    None of it opens a way out."""
    marker = tmp_path / "escaped"
    checked = 0
    for case in CASES:
        if not case.expect & {"violation", "contained"} or "MARKER" in case.script:
            continue
        if case.category in ("timeout", "memory"):
            continue  # the process's limits, not the Lua state's
        reply = lua.load(case.script.replace("MARKER", str(marker)))
        if not reply.ok:
            continue  # refused at load: never runs, traced or not
        assert lua.runtime is not None
        lua.runtime.apply_snapshot(snapshot.to_proto(sample_context()))
        first = _instrumented(lua, instrument)
        if "violation" in case.expect and first.error_kind == pb.ERROR_KIND_SANDBOX_VIOLATION:
            checked += 1
            continue
        second = _instrumented(lua, instrument)
        outcome = second.decision.reason if second.decision is not None else second.error_message
        assert "contained" in case.expect and outcome == "safe", (case.name, outcome)
        checked += 1
    assert checked >= 30 and not marker.exists()


def _instrumented(lua: InProcessRuntime, instrument: int) -> RunResult:
    assert lua.runtime is not None
    if instrument != pb.INSTRUMENT_DEBUG:
        return lua.runtime.run(False, False, instrument=instrument)
    channel = DebugChannel(lua.runtime.lua.table_from, "test.lua")
    channel.pump(iter([]))  # no client
    return lua.runtime.run(False, False, instrument=instrument, debug_wait=channel.wait)


# ------------------------------------------------------------------ the debugger, in process
class Session:
    """Drives a debug call as the Debug stream would: commands in, events out."""

    def __init__(self, lua: InProcessRuntime, source: str | None) -> None:
        if source is not None:
            reply = lua.load(source)
            assert reply.ok, reply.error.message
        assert lua.runtime is not None
        self.runtime = lua.runtime
        if source is not None:
            self.runtime.apply_snapshot(snapshot.to_proto(sample_context()))
        self.channel = DebugChannel(self.runtime.lua.table_from, "test.lua")
        self.result: RunResult | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @classmethod
    def attach(cls, lua: InProcessRuntime) -> Session:
        """A debug call on the script and context already loaded."""
        return cls(lua, None)

    def _run(self) -> None:
        self.result = self.runtime.run(
            False, False, instrument=pb.INSTRUMENT_DEBUG, debug_wait=self.channel.wait
        )
        self.channel.close()

    def event(self) -> pb.DebugEvent:
        event = self.channel.events.get(timeout=10)
        assert isinstance(event, pb.DebugEvent), "the script ended"
        return event

    def send(self, **command: object) -> pb.DebugEvent:
        self.channel.commands.put(pb.DebugCommand(**command))  # type: ignore[arg-type]
        return self.event()

    def evaluate(self, expression: str) -> pb.DebugEvent:
        return self.send(evaluate=pb.EvaluateRequest(frame=1, expression=expression))

    def resume(self, mode: int) -> pb.DebugEvent:
        return self.send(resume=pb.Resume(mode=mode))  # type: ignore[arg-type]

    def finish(self) -> RunResult:
        self.channel.commands.put(pb.DebugCommand(resume=pb.Resume(mode=pb.Resume.CONTINUE)))
        self.thread.join(10)
        assert self.result is not None
        return self.result


def _breakpoints(*points: tuple[int, str]) -> dict[str, object]:
    return {
        "set_breakpoints": pb.SetBreakpoints(
            breakpoints=[pb.Breakpoint(line=line, condition=cond) for line, cond in points]
        )
    }


def test_the_debugger_stops_steps_and_shows_the_script_only(lua: InProcessRuntime) -> None:
    session = Session(lua, SCRIPT)
    entry = session.event()
    assert entry.stopped.reason == "entry" and entry.stopped.line == 4
    set_ = session.send(**_breakpoints((6, "i == 3"), (2, "")))
    assert [b.line for b in set_.breakpoints.breakpoints] == [6, 2]
    stop = session.resume(pb.Resume.CONTINUE)
    assert stop.stopped.reason == "breakpoint" and stop.stopped.line == 6
    assert session.evaluate("i").evaluated.value == "3"
    frames = session.send(stack=pb.StackRequest()).frames
    assert [(f.name, f.line) for f in frames.frames] == [("schedule", 6)]
    local = session.send(variables=pb.VariablesRequest(reference=frames.frames[0].locals))
    by_name = {v.name: v for v in local.variables.variables}
    assert by_name["ctx"].type == "ctx" and by_name["job"].type == "job"
    assert by_name["q"].indexed == 5
    # ctx expands lazily: its queue, then a job's fields.
    ctx_fields = session.send(variables=pb.VariablesRequest(reference=by_name["ctx"].reference))
    queue_var = next(v for v in ctx_fields.variables.variables if v.name == "queue")
    jobs = session.send(variables=pb.VariablesRequest(reference=queue_var.reference, count=2))
    assert [v.name for v in jobs.variables.variables] == ["[1]", "[2]"]
    fields = session.send(
        variables=pb.VariablesRequest(reference=jobs.variables.variables[0].reference)
    )
    assert {"id", "priority", "model_ref"} <= {v.name for v in fields.variables.variables}
    upvalues = session.send(variables=pb.VariablesRequest(reference=frames.frames[0].upvalues))
    assert "seen" in {v.name for v in upvalues.variables.variables}
    # next: the loop's head again; then the predicate's breakpoint, inside a built-in.
    assert session.resume(pb.Resume.NEXT).stopped.line == 5
    inside = session.resume(pb.Resume.CONTINUE)
    assert inside.stopped.line == 2
    names = [f.name for f in session.send(stack=pb.StackRequest()).frames.frames]
    assert names == ["function at line 2", "schedule"]  # the built-in between is not shown
    session.send(**_breakpoints())  # else the next worker's call stops there again
    out = session.resume(pb.Resume.STEP_OUT)
    assert out.stopped.reason == "step" and out.stopped.line in (8, 9)
    result = session.finish()
    assert result.decision is not None and result.decision.WhichOneof("action") == "batch"


@pytest.mark.parametrize(
    ("expression", "refusal"),
    [
        ("idle(job)", "query built-ins"),
        ("(function() while true do end end)()", "no function definitions"),
        ("ctx.log_info('x')", "query built-ins"),
        ("ctx.platform_schedule(ctx)", "query built-ins"),
        ("job.id:upper()", "no method calls"),
        ("tostring(ctx)", "query built-ins"),
        ("ctx.get_job'job-1'", "with parentheses"),
        ("seen = 1", "no assignment"),
        ("math.random()", "query built-ins"),
        ("{1}", "no table constructors"),
        # Strings and comments hide nothing: the expression is tokenized, not matched.
        ("'\"' .. idle(job) .. '\"'", "query built-ins"),
        ("'--' .. idle(job)", "query built-ins"),
        ('[["]] .. idle(job) .. [["]]', "query built-ins"),
        ("'\"' .. (function() seen = 42 return '' end)() .. '\"'", "no function definitions"),
        ("1 --[[ comment ]] + idle(job)", "query built-ins"),
    ],
)
def test_evaluate_is_read_only(lua: InProcessRuntime, expression: str, refusal: str) -> None:
    session = Session(lua, SCRIPT)
    session.event()
    session.send(**_breakpoints((6, "")))
    session.resume(pb.Resume.CONTINUE)
    answer = session.evaluate(expression)
    assert answer.WhichOneof("event") == "error" and refusal in answer.error
    # Reads, and ctx's queries, are fine.
    assert session.evaluate("#ctx.queue + math.max(1, 2)").evaluated.value == "7"
    assert session.evaluate("ctx.get_job(job.id).priority").evaluated.value == '"interactive"'
    session.send(**_breakpoints())
    result = session.finish()
    assert result.error_kind == 0, result.error_message


HOSTILE = """hits = 0
local function count() hits = hits + 1 return 1 end
local mt = { __index = count, __len = count, __concat = count, __eq = count, __lt = count,
             __add = count, __tostring = function() hits = hits + 1 return "k" end }
M = { obj = setmetatable({}, mt), other = setmetatable({}, mt), f = count }
M.keys = { [setmetatable({}, mt)] = 1, [setmetatable({}, mt)] = 2 }
function schedule(ctx)
  -- ctx is the script's table too: fields a built-in would read, with metamethods.
  ctx.queued_at, ctx.slots_busy, ctx.slots_total = M.obj, M.obj, M.other
  local probe = M
  return { action = "wait", reason = tostring(hits) }
end
"""


@pytest.mark.parametrize(
    "expression",
    ["M.obj.x", "M.obj .. 'x'", "#M.obj", "M.obj == M.other", "M.obj < M.other",
     "M.obj + 1", "math.max(M.obj, 1)", "ctx.average(M.keys)", "M.f()", "probe.obj.y",
     "ctx.can_job_fit(ctx, ctx)", "ctx.calculate_wait_time(ctx)"],
)  # fmt: skip
def test_evaluate_runs_no_code_of_the_script(lua: InProcessRuntime, expression: str) -> None:
    """A script's metamethods, reached through plain tables, never run: the evaluator
    reads raw; nor does expanding a table whose keys have __tostring."""
    session = Session(lua, HOSTILE)
    session.event()
    session.send(**_breakpoints((11, "")))
    session.resume(pb.Resume.CONTINUE)
    session.evaluate(expression)  # an answer or a refusal, whichever: no code ran
    frame = session.send(stack=pb.StackRequest()).frames.frames[0]
    local = session.send(variables=pb.VariablesRequest(reference=frame.locals))
    probe = next(v for v in local.variables.variables if v.name == "probe")
    fields = session.send(variables=pb.VariablesRequest(reference=probe.reference))
    keys = next(v for v in fields.variables.variables if v.name == "keys")
    session.send(variables=pb.VariablesRequest(reference=keys.reference))
    session.send(**_breakpoints())
    result = session.finish()
    assert result.decision is not None and result.decision.reason == "0"


def test_names_that_are_not_text_reach_the_client_cleaned(lua: InProcessRuntime) -> None:
    source = """G = { ["\255\254"] = 1 }
function schedule(ctx)
  local t = G
  return { action = "wait" }
end
"""
    session = Session(lua, source)
    session.event()
    frames = session.send(stack=pb.StackRequest()).frames
    globals_ = session.send(variables=pb.VariablesRequest(reference=frames.globals))
    g = next(v for v in globals_.variables.variables if v.name == "G")
    fields = session.send(variables=pb.VariablesRequest(reference=g.reference))
    assert len(fields.variables.variables) == 1
    assert fields.variables.variables[0].name  # cleaned to text, not an error
    result = session.finish()
    assert result.error_kind == 0, result.error_message


def test_a_line_calling_the_scripts_own_functions_counts_and_stops_once(
    lua: InProcessRuntime,
) -> None:
    """LuaJIT reports a line again each time a function called on it returns."""
    source = """local function f(x)
  return x * 2
end
function schedule(ctx)
  local y = f(2) + f(3) + #ctx.queue
  return { action = "wait", reason = tostring(y) }
end
"""
    assert _counts(_run(lua, source, pb.INSTRUMENT_TRACE)) == {5: 1, 2: 2, 6: 1}
    session = Session(lua, source)
    assert session.event().stopped.line == 5
    assert session.resume(pb.Resume.NEXT).stopped.line == 6
    session.send(**_breakpoints())
    assert session.finish().decision.reason == "15"  # type: ignore[union-attr]


def test_looking_at_ctx_changes_nothing_the_script_sees(lua: InProcessRuntime) -> None:
    """Expanding ctx or evaluating ctx.queue before the script reads it builds nothing on
    ctx: on LuaJIT the queue's array is reused between calls, and a script may hold it."""
    source = """calls = 0
function schedule(ctx)
  calls = calls + 1
  if calls == 1 then Q = ctx.queue; Q[#Q + 1] = "extra"; return { action = "wait" } end
  local held = #Q
  local q = ctx.queue
  return { action = "wait", reason = held .. "/" .. #q }
end
"""
    reply = lua.load(source)
    assert reply.ok
    assert lua.runtime is not None
    lua.runtime.apply_snapshot(snapshot.to_proto(sample_context()))
    lua.runtime.run(False, False)
    session = Session.attach(lua)
    session.event()
    assert session.evaluate("#ctx.queue").evaluated.value == "5"
    frame = session.send(stack=pb.StackRequest()).frames.frames[0]
    local = session.send(variables=pb.VariablesRequest(reference=frame.locals))
    ctx_var = next(v for v in local.variables.variables if v.name == "ctx")
    fields = session.send(variables=pb.VariablesRequest(reference=ctx_var.reference))
    assert {"queue", "pools", "metrics"} <= {v.name for v in fields.variables.variables}
    result = session.finish()
    assert result.decision is not None and result.decision.reason == "6/5"


def test_a_built_in_kept_past_its_call_runs_plain_later(lua: InProcessRuntime) -> None:
    source = """function schedule(ctx)
  if not KEPT then KEPT = ctx.get_job end
  local j = KEPT("job-1")
  return { action = "wait", reason = j.id }
end
"""
    traced = _run(lua, source, pb.INSTRUMENT_TRACE)
    assert traced.diagnostics is not None and len(traced.diagnostics.calls) == 1
    assert lua.runtime is not None
    plain = lua.runtime.run(False, False)
    assert plain.decision is not None and plain.decision.reason == "job-1"
    again = lua.runtime.run(False, False, instrument=pb.INSTRUMENT_TRACE)
    # The kept wrapper is the first call's: it records nothing in a later call, traced
    # or not, and leaves no hook behind.
    assert again.diagnostics is not None and _counts(again) == {2: 1, 3: 1, 4: 1}


def test_a_debug_call_starts_without_the_last_ones_breakpoints(lua: InProcessRuntime) -> None:
    session = Session(lua, SCRIPT)
    session.event()
    session.send(**_breakpoints((6, "")))
    session.channel.pump(iter([]))  # the client goes while breakpoints are set
    session.thread.join(10)
    assert lua.runtime is not None
    second = Session.attach(lua)
    assert second.event().stopped.reason == "entry"
    result = second.finish()  # continue: no breakpoint of the first call stops it
    assert result.decision is not None
    left = second.channel.events.get_nowait()
    assert not isinstance(left, pb.DebugEvent)  # the end of the stream, no stop


def test_the_script_runs_on_when_the_client_goes(lua: InProcessRuntime) -> None:
    session = Session(lua, SCRIPT)
    session.event()
    session.channel.pump(iter([]))  # the stream ended at once
    session.thread.join(10)
    assert session.result is not None and session.result.decision is not None
    with pytest.raises(queue.Empty):
        session.channel.events.get_nowait()  # nothing after the close
        session.channel.events.get_nowait()


# ------------------------------------------------------------------ the gate, in real workers
async def test_only_a_diagnostics_worker_instruments_or_debugs(tmp_path: Path) -> None:
    spec = SchedulerSpec(name="s.lua", source=SCRIPT, platform_source=platform_source())
    worker = WorkerProcess(spec, tmp_path, "w1")
    await worker.start()
    try:
        request = pb.ScheduleRequest(
            epoch=1, seq=1, snapshot=snapshot.to_proto(sample_context()),
            instrument=pb.INSTRUMENT_TRACE,
        )  # fmt: skip
        reply = await worker.schedule(request, 5.0)
        assert reply.error.kind == pb.ERROR_KIND_INTERNAL
        assert "not started for diagnostics" in reply.error.message
        assert not reply.HasField("diagnostics") and not reply.HasField("decision")
        assert worker.stub is not None
        call = worker.stub.Debug()
        with pytest.raises(aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        worker.kill()
    async with DiagnosticWorker(SCRIPT, "s.lua") as diagnostics:
        reply = await diagnostics.run(sample_context(), pb.INSTRUMENT_PROFILE, timeout_s=10)
    assert reply.decision.WhichOneof("action") == "batch"
    # Timed by the worker's own clock, fine enough for a line (os.clock is not, there).
    assert reply.diagnostics.clock_ms > 0 and any(x.self_ms > 0 for x in reply.diagnostics.lines)
