"""Trace and profile a scheduler on one context (issue 18): what ran, and what it cost.

`diagnose(source, name, ctx, instrument=...)` starts a diagnostics worker
(`orchestrator/debugging/worker.py`) with the normal sandbox limits, runs the Lua
`source` (callers compile YAML first) on `ctx` and returns a `Diagnosis`:

- "trace": one traced run (the lines that ran with their counts, the order they ran
  in, every built-in call with its arguments and result), then one plain run, which
  says whether the script meets its deadline without the hooks;
- "profile": `rounds` profiled runs, each beside a plain one, on the same context.
  Per-line and per-function times are the MEDIAN over the profiled runs;
  counts, steps and calls are those of the first profiled run (a run on the same
  context does the same work). The plain runs' median, against the profiled runs'
  median, states the profiler's own overhead.

Plain times are those the worker measures inside schedule() (`run_ns`), instrumented
ones the hook's clock from when it is set (`clock_ms`): the snapshot's transfer and
conversion, and the building of its jobs before a hook is set, are not the script's.
Instrumented runs get a generous timeout (hooks slow a script tenfold or more); whether
the script met `deadline_ms` is judged on the plain runs. A timeout kills the worker,
so the runs stop there.

The script's failures (it does not load, raises, times out, returns no decision) are
part of the Diagnosis, not exceptions; only a failure of ours (no worker could be
started) raises. `Diagnosis.to_json()` is the shape the web UI and `--json` print;
`Diagnosis.text(source)` renders it for people.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
from grpc import aio

from orchestrator._proto import sandbox_pb2
from orchestrator.debugging.worker import DiagnosticWorker
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context
from orchestrator.domain.decision import Batch, Decision
from orchestrator.domain.errors import InvalidRequestError, SchedulerLoadError
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.attempt import ERROR_KINDS
from orchestrator.scheduling.cycle import Failure, ScriptLog
from orchestrator.scheduling.validation import validate
from orchestrator.wire import decision as decision_codec

Mode = Literal["trace", "profile"]
Key = TypeVar("Key")

INSTRUMENTS: dict[Mode, sandbox_pb2.Instrument.ValueType] = {
    "trace": sandbox_pb2.INSTRUMENT_TRACE,
    "profile": sandbox_pb2.INSTRUMENT_PROFILE,
}
# Plain and profiled runs of a profile: enough for a median that one slow run (a page
# fault, a GC cycle) does not move.
PROFILE_ROUNDS = 5
# Hooks slow a script down by an order of magnitude or more: an instrumented run (and,
# so that its time can be told, a plain one) gets this much, at least, instead of the
# deadline.
MIN_TIMEOUT_S = 5.0
TIMEOUT_DEADLINES = 50
# Built-in calls shown under each line of a trace; the rest are counted.
CALLS_PER_LINE = 5
# Actions of a batch decision a text shows.
DECISION_ACTIONS = 5
# Before a count ("ran 10 times") and after a ratio ("8.2 times slower").
TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass(frozen=True)
class LineStat:
    """A line of the script that ran: how often, its self time, and its text."""

    line: int
    count: int
    self_ms: float
    text: str

    def to_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "count": self.count,
            "self_ms": round(self.self_ms, 4),
            "text": self.text,
        }


@dataclass(frozen=True)
class CallRecord:
    """One call the script made to a ctx built-in (short forms of args and result)."""

    name: str
    args: str
    result: str
    line: int
    step: int
    raised: bool
    ms: float


@dataclass(frozen=True)
class FunctionStat:
    """A script function ("schedule", line 3) or a built-in ("ctx.get_job", line 0)."""

    name: str
    line: int
    calls: int
    self_ms: float


@dataclass(frozen=True)
class Diagnosis:
    """What a traced or profiled scheduler did on one context.

    `lines` are in the order each first ran (`steps` index into them); `text()` shows
    them in file order (trace) or by self time (profile). `error` is the script's own
    failure; `valid`/`invalid_reason` judge its decision against the context as the
    engine would. `plain_ms` and `instrumented_ms` are medians of the time inside
    schedule(); `met_deadline` is judged on the plain runs.
    """

    mode: Mode
    file: str
    decision: Decision | None = None
    valid: bool = False
    invalid_reason: str = ""
    error: Failure | None = None
    logs: tuple[ScriptLog, ...] = ()
    lines: tuple[LineStat, ...] = ()
    steps: tuple[int, ...] = ()
    steps_dropped: int = 0
    calls: tuple[CallRecord, ...] = ()
    calls_dropped: int = 0
    functions: tuple[FunctionStat, ...] = ()
    plain_ms: float = 0.0
    instrumented_ms: float = 0.0
    clock_ms: float = 0.0
    deadline_ms: int = 50
    met_deadline: bool = False
    rounds: int = 0  # instrumented runs the figures come from

    @property
    def ok(self) -> bool:
        """The script itself returned a decision that passes validation."""
        return self.error is None and self.valid

    @property
    def overhead(self) -> float:
        """Instrumented over plain time in schedule(); 0 when either is unknown."""
        if self.plain_ms <= 0 or self.instrumented_ms <= 0:
            return 0.0
        return self.instrumented_ms / self.plain_ms

    def to_json(self) -> dict[str, Any]:
        """The JSON the web UI and `--json` print (keys documented in the module)."""
        error = self.error
        return {
            "mode": self.mode,
            "file": self.file,
            "ok": self.ok,
            "decision": None if self.decision is None else decisions.to_dict(self.decision),
            "decision_text": "" if self.decision is None else decisions.describe(self.decision),
            "valid": self.valid,
            "invalid_reason": self.invalid_reason,
            "error": None
            if error is None
            else {"kind": error.kind, "message": error.message, "traceback": error.traceback},
            "logs": [{"level": log.level, "message": log.message} for log in self.logs],
            "lines": [line.to_json() for line in self.lines],
            "steps": list(self.steps),
            "steps_dropped": self.steps_dropped,
            "calls": [
                {
                    "name": c.name,
                    "args": c.args,
                    "result": c.result,
                    "line": c.line,
                    "step": c.step,
                    "raised": c.raised,
                    "ms": round(c.ms, 4),
                }
                for c in self.calls
            ],
            "calls_dropped": self.calls_dropped,
            "functions": [
                {"name": f.name, "line": f.line, "calls": f.calls, "self_ms": round(f.self_ms, 4)}
                for f in self.functions
            ],
            "plain_ms": round(self.plain_ms, 3),
            "instrumented_ms": round(self.instrumented_ms, 3),
            "overhead": round(self.overhead, 1),
            "clock_ms": round(self.clock_ms, 3),
            "rounds": self.rounds,
            "deadline_ms": self.deadline_ms,
            "met_deadline": self.met_deadline,
        }

    def text(self, source: str, *, top: int = 15) -> str:
        """For people. `source` is the Lua the lines refer to; `top`: lines and
        functions a profile lists."""
        source_lines = source.splitlines()
        body = (
            self._trace_text(source_lines)
            if self.mode == "trace"
            else self._profile_text(source_lines, top)
        )
        return "\n".join([*body, *self._outcome_text()])

    def hot_lines(self, count: int) -> list[LineStat]:
        """The `count` lines with the most self time, hottest first."""
        return sorted(self.lines, key=lambda s: (-s.self_ms, s.line))[:count]

    # ------------------------------------------------------------------ rendering
    def _label(self, line: int) -> str:
        return f"{self.file}:{line}"

    def _trace_text(self, source_lines: list[str]) -> list[str]:
        out = [
            f"trace of {self.file}: {len(self.lines)} lines ran, "
            f"{len(self.steps) + self.steps_dropped} steps, "
            f"{len(self.calls) + self.calls_dropped} built-in calls"
        ]
        calls_by_line: dict[int, list[CallRecord]] = defaultdict(list)
        for call in self.calls:
            calls_by_line[call.line].append(call)
        label_width = max((len(self._label(s.line)) for s in self.lines), default=0)
        count_width = max((len(str(s.count)) for s in self.lines), default=1) + 1
        indent = " " * (label_width + count_width + 4)
        for stat in sorted(self.lines, key=lambda s: s.line):
            text = _source_line(source_lines, stat.line)
            out.append(
                f"{self._label(stat.line):<{label_width}}  "
                f"{TIMES + str(stat.count):>{count_width}}  {text}"
            )
            line_calls = calls_by_line.get(stat.line, [])
            for call in line_calls[:CALLS_PER_LINE]:
                out.append(f"{indent}→ ctx.{call.name}({call.args}){_call_outcome(call)}")
            if len(line_calls) > CALLS_PER_LINE:
                out.append(f"{indent}… {len(line_calls) - CALLS_PER_LINE} more calls")
        if self.steps_dropped:
            out.append(
                f"note: the order of the last {self.steps_dropped} steps was not kept "
                "(their lines are still counted above)"
            )
        if self.calls_dropped:
            out.append(f"note: {self.calls_dropped} more built-in calls were not recorded")
        return out

    def _profile_text(self, source_lines: list[str], top: int) -> list[str]:
        total = sum(s.self_ms for s in self.lines)
        out = [
            f"profile of {self.file}: median of {self.rounds} profiled runs, "
            f"{total:.2f} ms on {len(self.lines)} lines"
        ]
        hottest = self.hot_lines(top)
        if hottest:
            out.append("hottest lines (self time):")
        label_width = max((len(self._label(s.line)) for s in hottest), default=0)
        count_width = max((len(str(s.count)) for s in hottest), default=1) + 1
        for stat in hottest:
            share = stat.self_ms / total if total > 0 else 0.0
            out.append(
                f"  {self._label(stat.line):<{label_width}}  "
                f"{TIMES + str(stat.count):>{count_width}}  {stat.self_ms:9.3f} ms  {share:6.1%}  "
                f"{_source_line(source_lines, stat.line).strip()}"
            )
        if len(self.lines) > len(hottest):
            out.append(f"  … {len(self.lines) - len(hottest)} more lines")
        functions = sorted(self.functions, key=lambda f: (-f.self_ms, f.name))[:top]
        if functions:
            out.append("functions (self time):")
            name_width = max(len(_function_label(f)) for f in functions)
            for function in functions:
                out.append(
                    f"  {_function_label(function):<{name_width}}  {TIMES}{function.calls:<7} "
                    f"{function.self_ms:9.3f} ms"
                )
        if self.overhead:
            out.append(
                f"profiled run {self.instrumented_ms:.2f} ms vs {self.plain_ms:.2f} ms plain "
                f"({self.overhead:.1f}{TIMES}); per-line times include the profiler's hook cost, "
                "so compare lines with one another, not with the plain run; a built-in's time "
                "is also in the line that called it"
            )
        return out

    def _outcome_text(self) -> list[str]:
        out: list[str] = []
        if self.error is not None:
            out.append(f"error: {self.error.kind}: {self.error.message}")
            trace = self.error.traceback.removeprefix(self.error.message).strip()
            out.extend("  " + line for line in trace.splitlines())
        if self.decision is not None:
            verdict = "valid" if self.valid else f"INVALID: {self.invalid_reason}"
            out.append(f"decision: {_decision_text(self.decision)} ({verdict})")
        if self.logs:
            out.append("logs:")
            out.extend(f"  [{log.level}] {log.message}" for log in self.logs)
        if self.plain_ms > 0:
            within = "within" if self.met_deadline else "OVER"
            out.append(
                f"plain run: {self.plain_ms:.2f} ms in schedule(), {within} the "
                f"{self.deadline_ms} ms deadline"
            )
        return out


def _source_line(source_lines: list[str], line: int) -> str:
    return source_lines[line - 1].rstrip() if 0 < line <= len(source_lines) else ""


def _call_outcome(call: CallRecord) -> str:
    """` = result`, ` raised error`, or nothing for a call that returned nothing."""
    if call.raised:
        return f" raised {call.result}"
    return f" = {call.result}" if call.result else ""


def _function_label(function: FunctionStat) -> str:
    """`schedule (line 1)`; built-ins, and names that say their line, as they are."""
    if not function.line or f"line {function.line}" in function.name:
        return function.name
    return f"{function.name} (line {function.line})"


def _decision_text(decision: Decision) -> str:
    """One line, even for a long batch: its first actions, then how many more."""
    actions = decisions.flatten(decision)
    if not isinstance(decision, Batch) or len(actions) <= DECISION_ACTIONS:
        return decisions.describe(decision)
    shown = "; ".join(decisions.describe(a) for a in actions[:DECISION_ACTIONS])
    return f"batch of {len(actions)}: {shown}; … {len(actions) - DECISION_ACTIONS} more"


# ---------------------------------------------------------------------- running


@dataclass
class _Run:
    """One run's outcome: its reply, or how the call itself failed."""

    reply: sandbox_pb2.ScheduleReply | None
    failure: Failure | None = None

    @property
    def ms(self) -> float:
        return self.reply.run_ns / 1e6 if self.reply is not None else 0.0


def instrumented_timeout_s(deadline_ms: int) -> float:
    """The timeout of a diagnostic run: `TIMEOUT_DEADLINES` deadlines, at least 5 s."""
    return max(MIN_TIMEOUT_S, TIMEOUT_DEADLINES * deadline_ms / 1000)


async def diagnose(
    source: str,
    name: str,
    ctx: Context,
    *,
    instrument: Mode,
    language: str = "luajit",
    deadline_ms: int = 50,
    limits: SandboxLimits | None = None,
    rounds: int = PROFILE_ROUNDS,
    timeout_s: float | None = None,
) -> Diagnosis:
    """Trace or profile the Lua `source` (named `name`, as tracebacks show it) on `ctx`.

    `rounds`: plain and profiled runs of a profile (a trace runs once of each).
    `timeout_s`: of each run; default `instrumented_timeout_s(deadline_ms)`.
    Raises SandboxUnavailableError when no diagnostics worker can be started.
    """
    if rounds < 1:
        raise InvalidRequestError("rounds", "must be at least 1")
    limits = limits or SandboxLimits(deadline_ms=deadline_ms)
    timeout_s = timeout_s or instrumented_timeout_s(deadline_ms)
    plain: list[_Run] = []
    instrumented: list[_Run] = []
    try:
        async with DiagnosticWorker(source, name, language=language, limits=limits) as worker:

            async def run(level: sandbox_pb2.Instrument.ValueType) -> _Run:
                try:
                    return _Run(await worker.run(ctx, level, timeout_s=timeout_s))
                except aio.AioRpcError as exc:
                    return _Run(None, _call_failure(exc, timeout_s))

            # Side by side, so that the machine's noise falls on both alike. An
            # instrumented run turns LuaJIT's compiler off for the call and flushes what
            # the plain runs compiled (lua/instrument.lua), so it still sees every line.
            runs = 1 if instrument == "trace" else rounds
            schedule = [INSTRUMENTS[instrument], sandbox_pb2.INSTRUMENT_NONE] * runs
            for level in schedule:
                outcome = await run(level)
                (plain if level == sandbox_pb2.INSTRUMENT_NONE else instrumented).append(outcome)
                if outcome.reply is None:
                    break  # a timeout or a crash: the worker is gone
    except SchedulerLoadError as exc:
        return Diagnosis(
            mode=instrument,
            file=name,
            error=Failure("load_error", str(exc), exc.traceback),
            deadline_ms=deadline_ms,
        )
    return _diagnosis(instrument, name, source, ctx, limits, deadline_ms, plain, instrumented)


async def time_in_schedule(
    source: str,
    name: str,
    contexts: Mapping[str, Context],
    *,
    language: str = "luajit",
    deadline_ms: int = 50,
) -> dict[str, float]:
    """Ms in schedule() of one plain run on each of `contexts`, in one diagnostics
    worker: where a script is slowest, without the transport's share. A run that fails
    counts as infinitely slow, and a timeout ends the runs (the worker is gone).
    Raises SchedulerLoadError and SandboxUnavailableError as the worker does."""
    limits = SandboxLimits(deadline_ms=deadline_ms)
    timeout_s = instrumented_timeout_s(deadline_ms)
    times: dict[str, float] = {}
    async with DiagnosticWorker(source, name, language=language, limits=limits) as worker:
        for label, ctx in contexts.items():
            try:
                reply = await worker.run(ctx, timeout_s=timeout_s)
            except aio.AioRpcError:
                times[label] = math.inf
                break
            times[label] = math.inf if reply.HasField("error") else reply.run_ns / 1e6
    return times


def _call_failure(exc: aio.AioRpcError, timeout_s: float) -> Failure:
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Failure(
            "timeout",
            f"no decision within {timeout_s:.0f} s (the diagnostic runs' limit, not the "
            "deadline); the worker was killed",
        )
    return Failure("worker_crash", f"the diagnostics worker failed ({exc.code().name})")


def _diagnosis(
    mode: Mode,
    name: str,
    source: str,
    ctx: Context,
    limits: SandboxLimits,
    deadline_ms: int,
    plain: list[_Run],
    instrumented: list[_Run],
) -> Diagnosis:
    """Fold the runs into a Diagnosis: the script's outcome is the first instrumented
    run's (or the plain run's, when no instrumented run came back)."""
    outcome = _outcome(instrumented[0] if instrumented else plain[0], ctx, limits)
    plain_done = [r.ms for r in plain if r.reply is not None]
    plain_ms = statistics.median(plain_done) if plain_done else 0.0
    replies = [r.reply for r in instrumented if r.reply is not None]
    diagnostics = replies[0].diagnostics if replies else sandbox_pb2.Diagnostics()
    source_lines = source.splitlines()
    line_ms = _medians([{s.line: s.self_ms for s in r.diagnostics.lines} for r in replies])
    function_ms = _medians(
        [{(f.name, f.line): f.self_ms for f in r.diagnostics.functions} for r in replies]
    )
    return Diagnosis(
        mode=mode,
        file=diagnostics.file or name,
        decision=outcome.decision,
        valid=outcome.valid,
        invalid_reason=outcome.invalid_reason,
        error=outcome.error,
        logs=outcome.logs,
        lines=tuple(
            LineStat(s.line, s.count, line_ms[s.line], _source_line(source_lines, s.line))
            for s in diagnostics.lines
        ),
        steps=tuple(diagnostics.steps),
        steps_dropped=diagnostics.steps_dropped,
        calls=tuple(
            CallRecord(c.name, c.args, c.result, c.line, c.step, c.raised, c.ms)
            for c in diagnostics.calls
        ),
        calls_dropped=diagnostics.calls_dropped,
        functions=tuple(
            FunctionStat(f.name, f.line, f.calls, function_ms[(f.name, f.line)])
            for f in diagnostics.functions
        ),
        plain_ms=plain_ms,
        # From the moment the hook is set: the worker first builds every job of the
        # fresh snapshot (lua/instrument.lua), which a plain run does only for the jobs
        # it reads, so run_ns would charge that to the profiler.
        instrumented_ms=statistics.median(r.diagnostics.clock_ms for r in replies)
        if replies
        else 0.0,
        clock_ms=statistics.median(r.diagnostics.clock_ms for r in replies) if replies else 0.0,
        deadline_ms=deadline_ms,
        # A plain run that timed out (or never ran) did not meet it.
        met_deadline=bool(plain) and len(plain_done) == len(plain) and plain_ms <= deadline_ms,
        rounds=len(replies),
    )


@dataclass(frozen=True)
class _Outcome:
    """The script's part of a Diagnosis: its decision and verdict, or its error."""

    decision: Decision | None = None
    valid: bool = False
    invalid_reason: str = ""
    error: Failure | None = None
    logs: tuple[ScriptLog, ...] = ()


def _outcome(run: _Run, ctx: Context, limits: SandboxLimits) -> _Outcome:
    reply = run.reply
    if reply is None:
        return _Outcome(error=run.failure)
    logs = tuple(ScriptLog(r.level, r.message) for r in reply.logs)
    if reply.HasField("error"):
        kind = ERROR_KINDS.get(reply.error.kind, "internal")
        return _Outcome(error=Failure(kind, reply.error.message, reply.error.traceback), logs=logs)
    if not reply.HasField("decision"):
        return _Outcome(
            error=Failure("invalid_decision", "the worker returned no decision"), logs=logs
        )
    decision = decision_codec.from_proto(reply.decision)
    verdict = validate(decision, ctx, max_batch_actions=limits.max_batch_actions)
    return _Outcome(decision, verdict.ok, verdict.summary(), logs=logs)


def _medians(samples: list[dict[Key, float]]) -> dict[Key, float]:
    """Per key, the median over the runs; a run where a key is missing counts 0 for it."""
    keys = {key for sample in samples for key in sample}
    return {key: statistics.median(sample.get(key, 0.0) for sample in samples) for key in keys}
