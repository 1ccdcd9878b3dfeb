"""Trace and profile (issue 18): `diagnose` on the specs' examples, in real diagnostics
workers, and the Diagnosis's JSON and text.

The examples are the verbatim copies in schedulers/examples/ (tests/schedulers/
test_examples.py holds them to the specs).
"""

from __future__ import annotations

import re

import pytest

from orchestrator._proto import sandbox_pb2
from orchestrator.debugging.diagnose import (
    TIMES,
    CallRecord,
    Diagnosis,
    FunctionStat,
    LineStat,
    _diagnosis,
    _Run,
    diagnose,
)
from orchestrator.domain.decision import Dispatch, EvictWorker
from orchestrator.domain.samples import sample_context
from orchestrator.policy.validate import bank_context
from orchestrator.sandbox.limits import SandboxLimits
from tests.conftest import LANGUAGES, REPO
from tests.schedulers.test_examples import over_threshold

EXAMPLES = REPO / "schedulers" / "examples"
EVICTION = (EXAMPLES / "runtime-7.4-vram-aware-eviction.lua").read_text()
DETERMINISM = (EXAMPLES / "runtime-7.3-determinism-first.lua").read_text()
ERROR = (EXAMPLES / "runtime-8.1-error.lua").read_text()

DOCUMENTED_KEYS = {
    "mode", "file", "ok", "decision", "decision_text", "valid", "invalid_reason", "error",
    "logs", "lines", "steps", "steps_dropped", "calls", "calls_dropped", "functions",
    "plain_ms", "instrumented_ms", "overhead", "deadline_ms", "met_deadline",
}  # fmt: skip


def counts(diagnosis: Diagnosis) -> dict[int, int]:
    return {stat.line: stat.count for stat in diagnosis.lines}


def line_of_step(diagnosis: Diagnosis, step: int) -> int:
    """The line that ran at `step` (0-based index into steps)."""
    return diagnosis.lines[diagnosis.steps[step]].line


# ------------------------------------------------------------------ trace, in workers


@pytest.mark.parametrize("language", LANGUAGES)
async def test_trace_of_the_eviction_example_records_calls_and_decision(language: str) -> None:
    """runtime-spec 7.4 on the sample context: both pools' utilisation is read (below
    the threshold), then the first job goes to the least loaded worker; each built-in
    call is listed with its arguments, result and the line that made it."""
    diagnosis = await diagnose(
        EVICTION, "evict.lua", sample_context(), instrument="trace", language=language
    )
    assert diagnosis.ok and diagnosis.error is None
    assert diagnosis.decision == Dispatch("job-1", "worker-4") and diagnosis.valid
    assert diagnosis.file == "evict.lua" and diagnosis.mode == "trace"
    assert [(c.name, c.args, c.line) for c in diagnosis.calls] == [
        ("get_pool_utilization", '"pool-1"', 4),
        ("get_pool_utilization", '"pool-2"', 4),
        ("find_least_loaded_worker", '"llama-8b"', 23),
    ]
    # pool-1: 61 of 128 GiB allocated; pool-2: 16 of 80.
    assert [c.result for c in diagnosis.calls[:2]] == ["0.476562", "0.2"]
    assert diagnosis.calls[2].result.startswith('{id="worker-4"')
    assert not any(c.raised for c in diagnosis.calls)
    for call in diagnosis.calls:  # `step` lines had run: the last of them made the call
        assert line_of_step(diagnosis, call.step - 1) == call.line
    # Lines are listed in the order each first ran; the steps replay that order.
    assert [s.line for s in diagnosis.lines][:3] == [3, 4, 6]
    assert [line_of_step(diagnosis, i) for i in range(len(diagnosis.steps))][-1] == 25
    assert diagnosis.lines[0].text == "  for _, pool in ipairs(ctx.pools) do"
    assert diagnosis.steps_dropped == 0 and diagnosis.calls_dropped == 0
    assert diagnosis.functions == ()  # per-function figures are the profile's
    assert 0 < diagnosis.plain_ms < 50 and diagnosis.met_deadline
    assert diagnosis.instrumented_ms > 0 and diagnosis.rounds == 1

    text = diagnosis.text(EVICTION)
    assert re.search(
        rf"^evict\.lua:4 +{TIMES}2 +  local utilization = ctx\.get_pool_utilization", text, re.M
    )
    assert '→ ctx.get_pool_utilization("pool-1") = 0.476562' in text
    assert '→ ctx.find_least_loaded_worker("llama-8b") = {id="worker-4"' in text
    assert "decision: dispatch job-1 -> worker-4 (valid)" in text
    assert re.search(r"plain run: [\d.]+ ms in schedule\(\), within the 50 ms deadline", text)
    # Lines in file order: the loop's before the dispatch's.
    assert text.index("evict.lua:3 ") < text.index("evict.lua:21 ") < text.index("evict.lua:25 ")


@pytest.mark.parametrize("language", LANGUAGES)
async def test_trace_of_the_eviction_example_over_the_threshold(language: str) -> None:
    """Over 90 % VRAM, pool-1's least recently used worker is evicted, with the log line."""
    diagnosis = await diagnose(
        EVICTION, "evict.lua", over_threshold(sample_context()), instrument="trace",
        language=language,
    )  # fmt: skip
    assert diagnosis.decision == EvictWorker("worker-3", reason="vram_threshold_exceeded")
    assert diagnosis.ok
    assert [(c.name, c.args, c.line) for c in diagnosis.calls] == [
        ("get_pool_utilization", '"pool-1"', 4),
        ("find_worker_to_evict_lru", '"pool-1"', 8),
        ("log_warn", '"Pool pool-1 over threshold, evicting ..."', 10),
    ]
    assert diagnosis.calls[0].result == "0.95"
    assert diagnosis.calls[1].result.startswith('{id="worker-3"')
    assert [(log.level, log.message) for log in diagnosis.logs] == [
        ("warn", "Pool pool-1 over threshold, evicting worker: worker-3")
    ]
    # The normal path never ran.
    assert not {21, 22, 23, 24, 25} & set(counts(diagnosis))


@pytest.mark.parametrize("language", LANGUAGES)
async def test_trace_counts_each_line_as_often_as_it_ran(language: str) -> None:
    """A loop over N items runs its `for` line N + 1 times; straight-line code once.
    (Lines holding only `end`, or the fields of a returned table, may appear or not,
    depending on the runtime's bytecode.)"""
    below = await diagnose(
        EVICTION, "evict.lua", sample_context(), instrument="trace", language=language
    )
    ran = counts(below)
    assert {line: ran[line] for line in (3, 4, 6, 21, 22, 23, 24, 25)} == {
        3: 3, 4: 2, 6: 2, 21: 1, 22: 1, 23: 1, 24: 1, 25: 1,
    }  # fmt: skip
    assert set(ran) <= {3, 4, 6, 17, 18, 21, 22, 23, 24, 25}
    over = await diagnose(
        EVICTION, "evict.lua", over_threshold(sample_context()), instrument="trace",
        language=language,
    )  # fmt: skip
    ran = counts(over)
    assert {line: ran[line] for line in (3, 4, 6, 8, 9, 10, 11)} == dict.fromkeys(
        (3, 4, 6, 8, 9, 10, 11), 1
    )
    assert set(ran) <= {3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15}


async def test_a_script_error_is_part_of_the_diagnosis() -> None:
    """runtime-spec 8.1 raises: the trace shows the line, the error and its traceback."""
    diagnosis = await diagnose(ERROR, "error.lua", sample_context(), instrument="trace")
    assert not diagnosis.ok and diagnosis.decision is None
    assert diagnosis.error is not None and diagnosis.error.kind == "lua_error"
    assert "Something went wrong!" in diagnosis.error.message
    assert "error.lua:3" in diagnosis.error.traceback
    assert 3 in counts(diagnosis)
    text = diagnosis.text(ERROR)
    assert "error: lua_error:" in text and "Something went wrong!" in text
    assert diagnosis.to_json()["error"]["kind"] == "lua_error"


async def test_a_script_that_does_not_load_or_decides_wrongly() -> None:
    """A load error and a decision the validator rejects are reported, not raised."""
    broken = await diagnose(
        "function schedule(ctx\n", "broken.lua", sample_context(), instrument="profile"
    )
    assert broken.error is not None and broken.error.kind == "load_error"
    assert broken.lines == () and not broken.ok and not broken.met_deadline
    wrong = await diagnose(
        'function schedule(ctx)\n  return {action = "dispatch", job_id = "nope", '
        'worker_id = "worker-1"}\nend\n',
        "wrong.lua",
        sample_context(),
        instrument="trace",
    )
    assert wrong.error is None and wrong.decision == Dispatch("nope", "worker-1")
    assert not wrong.valid and not wrong.ok
    assert "unknown_job" in wrong.invalid_reason
    assert f"(INVALID: {wrong.invalid_reason})" in wrong.text("")
    assert wrong.to_json()["valid"] is False


@pytest.mark.slow
async def test_a_runaway_script_times_out_and_misses_its_deadline() -> None:
    """An endless loop ends at the diagnostics' own timeout (5 s), not at the deadline."""
    diagnosis = await diagnose(
        "function schedule(ctx)\n  while true do end\nend\n",
        "spin.lua",
        sample_context(),
        instrument="profile",
    )
    assert diagnosis.error is not None and diagnosis.error.kind == "timeout"
    assert "no decision within 5 s" in diagnosis.error.message
    assert not diagnosis.met_deadline and diagnosis.rounds == 0


# ------------------------------------------------------------------ profile, in workers


@pytest.mark.slow
@pytest.mark.parametrize("language", LANGUAGES)
async def test_profile_of_the_10k_bank_context(language: str) -> None:
    """runtime-spec 7.3 on the bank's 10,000 jobs: its filter_jobs predicate is the hot
    line, called once per job; the overhead of the profiler is stated."""
    ctx = bank_context("10k-jobs")
    diagnosis = await diagnose(
        DETERMINISM, "determinism.lua", ctx, instrument="profile", language=language, rounds=3
    )
    assert diagnosis.ok and diagnosis.rounds == 3
    hottest = diagnosis.hot_lines(3)
    assert hottest[0].line == 4 and hottest[0].text == "    return job.seed ~= nil"
    assert [s.self_ms for s in hottest] == sorted((s.self_ms for s in hottest), reverse=True)
    functions = {f.name: f for f in diagnosis.functions}
    assert functions["ctx.filter_jobs"].calls == 1 and functions["ctx.filter_jobs"].line == 0
    predicate = next(f for f in diagnosis.functions if f.line == 3)
    assert predicate.calls == len(ctx.queue) == 10_000
    assert functions["schedule"].line == 1 and functions["schedule"].calls == 1
    assert diagnosis.instrumented_ms > diagnosis.plain_ms > 0
    assert diagnosis.overhead > 1 and diagnosis.clock_ms > 0
    assert diagnosis.steps_dropped > 0  # 10,000 predicate calls overflow the steps kept

    text = diagnosis.text(DETERMINISM, top=3)
    first = text.splitlines()[2]  # after the header and "hottest lines (self time):"
    assert first.lstrip().startswith("determinism.lua:4 ") and "return job.seed ~= nil" in first
    assert re.search(rf"profiled run [\d.]+ ms vs [\d.]+ ms plain \([\d.]+{TIMES}\)", text)
    assert "per-line times include the profiler's hook cost" in text
    assert "functions (self time):" in text and "ctx.filter_jobs" in text


@pytest.mark.slow
@pytest.mark.parametrize("language", LANGUAGES)
async def test_profile_counts_a_per_job_line_once_per_job(language: str) -> None:
    ctx = bank_context("10k-jobs")
    diagnosis = await diagnose(
        DETERMINISM, "determinism.lua", ctx, instrument="profile", language=language, rounds=1
    )
    assert counts(diagnosis)[4] == len(ctx.queue)


# ------------------------------------------------------------------ pure: JSON and text


def reply(
    line_ms: dict[int, float], run_ms: float, *, function_ms: float = 0.0
) -> sandbox_pb2.ScheduleReply:
    out = sandbox_pb2.ScheduleReply(run_ns=int(run_ms * 1e6))
    out.decision.wait.SetInParent()
    out.diagnostics.file = "x.lua"
    out.diagnostics.clock_ms = run_ms
    for line, ms in line_ms.items():
        out.diagnostics.lines.add(line=line, count=line, self_ms=ms)
    out.diagnostics.functions.add(name="schedule", line=1, calls=1, self_ms=function_ms)
    return out


def test_profile_figures_are_medians_over_the_profiled_runs() -> None:
    """Per line and per function, the median over the rounds (a line missing from a
    round counts 0 there); the plain runs' median says whether the deadline was met."""
    plain = [_Run(reply({}, ms)) for ms in (2.0, 40.0, 3.0)]
    profiled = [
        _Run(reply({2: 1.0, 3: 5.0}, 20.0, function_ms=6.0)),
        _Run(reply({2: 9.0, 3: 7.0}, 30.0, function_ms=16.0)),
        _Run(reply({2: 2.0}, 25.0, function_ms=4.0)),
    ]
    source = "function schedule(ctx)\n  local a = 1\n  return {action = 'wait'}\nend\n"
    diagnosis = _diagnosis(
        "profile", "x.lua", source, sample_context(), SandboxLimits(), 5, plain, profiled
    )
    assert [(s.line, s.count, s.self_ms, s.text) for s in diagnosis.lines] == [
        (2, 2, 2.0, "  local a = 1"),
        (3, 3, 5.0, "  return {action = 'wait'}"),
    ]
    assert diagnosis.functions == (FunctionStat("schedule", 1, 1, 6.0),)
    assert diagnosis.plain_ms == 3.0 and diagnosis.instrumented_ms == 25.0
    assert diagnosis.overhead == pytest.approx(25 / 3)
    assert diagnosis.rounds == 3 and diagnosis.ok
    assert diagnosis.deadline_ms == 5 and diagnosis.met_deadline  # 3 ms median within 5


def sample_diagnosis(**overrides: object) -> Diagnosis:
    fields: dict[str, object] = {
        "mode": "trace",
        "file": "x.lua",
        "decision": Dispatch("job-1", "w-1"),
        "valid": True,
        "lines": (
            LineStat(2, 1, 0.5, "  local q = ctx.queue"),
            LineStat(3, 8, 3.0, "  for _, job in ipairs(q) do"),
            LineStat(4, 7, 1.5, "    local w = ctx.get_job(job.id)"),
        ),
        "steps": (0, 1, 2, 1),
        "calls": (
            CallRecord("log_info", '"hi"', "", 2, 1, False, 0.0),
            *(
                CallRecord("get_job", f'"job-{i}"', f"job job-{i}", 4, 3 + 2 * i, False, 0.01)
                for i in range(7)
            ),
        ),
        "functions": (FunctionStat("schedule", 1, 1, 4.0), FunctionStat("ctx.get_job", 0, 7, 1.0)),
        "plain_ms": 1.2,
        "instrumented_ms": 9.84,
        "deadline_ms": 50,
        "met_deadline": True,
        "rounds": 1,
    }
    return Diagnosis(**{**fields, **overrides})  # type: ignore[arg-type]


def test_json_has_exactly_the_documented_keys() -> None:
    out = sample_diagnosis(steps_dropped=3, calls_dropped=2).to_json()
    assert set(out) >= DOCUMENTED_KEYS
    assert set(out) - DOCUMENTED_KEYS == {"clock_ms", "rounds"}
    assert out["decision"] == {"action": "dispatch", "job_id": "job-1", "worker_id": "w-1"}
    assert out["decision_text"] == "dispatch job-1 -> w-1"
    assert out["lines"][0] == {
        "line": 2,
        "count": 1,
        "self_ms": 0.5,
        "text": "  local q = ctx.queue",
    }
    assert out["calls"][1] == {
        "name": "get_job", "args": '"job-0"', "result": "job job-0", "line": 4, "step": 3,
        "raised": False, "ms": 0.01,
    }  # fmt: skip
    assert out["functions"][1] == {"name": "ctx.get_job", "line": 0, "calls": 7, "self_ms": 1.0}
    assert (out["plain_ms"], out["instrumented_ms"], out["overhead"]) == (1.2, 9.84, 8.2)
    assert out["ok"] and out["error"] is None and out["met_deadline"]


def test_trace_text_caps_calls_per_line_and_notes_what_was_dropped() -> None:
    text = sample_diagnosis(steps_dropped=3, calls_dropped=2).text(
        "function schedule(ctx)\n  local q = ctx.queue\n  for _, job in ipairs(q) do\n"
        "    local w = ctx.get_job(job.id)\n  end\nend\n"
    )
    lines = text.splitlines()
    assert lines[0] == "trace of x.lua: 3 lines ran, 7 steps, 10 built-in calls"
    assert lines[1] == f"x.lua:2  {TIMES}1    local q = ctx.queue"
    assert lines[2].strip() == '→ ctx.log_info("hi")'  # it returned nothing
    assert lines[4] == f"x.lua:4  {TIMES}7      local w = ctx.get_job(job.id)"
    assert lines[5].strip() == '→ ctx.get_job("job-0") = job job-0'
    assert lines[9].strip() == '→ ctx.get_job("job-4") = job job-4'
    assert lines[10].strip() == "… 2 more calls"
    assert "note: the order of the last 3 steps was not kept" in text
    assert "note: 2 more built-in calls were not recorded" in text


def test_profile_text_sorts_lines_by_self_time_and_states_the_overhead() -> None:
    text = sample_diagnosis(mode="profile").text("", top=2)
    lines = text.splitlines()
    assert lines[0] == "profile of x.lua: median of 1 profiled runs, 5.00 ms on 3 lines"
    assert re.fullmatch(rf" +x\.lua:3 +{TIMES}8 +3\.000 ms +60\.0% +", lines[2])  # no source given
    assert re.fullmatch(rf" +x\.lua:4 +{TIMES}7 +1\.500 ms +30\.0% +", lines[3])
    assert lines[4] == "  … 1 more lines"
    assert lines[6].split() == ["schedule", "(line", "1)", f"{TIMES}1", "4.000", "ms"]
    assert (
        f"profiled run 9.84 ms vs 1.20 ms plain (8.2{TIMES}); per-line times include the "
        "profiler's hook cost"
    ) in text
