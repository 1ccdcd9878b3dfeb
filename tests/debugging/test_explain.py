"""`scheduler replay --seq`: explaining a logged decision, and the log's scheduler_sha256.

`explain` is pure and tested on hand-made cycles; the log's new field, `find_cycle`
and `replay_cycle` run on logs real engines wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orchestrator.debugging.diagnose import Diagnosis
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker, Wait
from orchestrator.domain.errors import ConfigError, NotFoundError
from orchestrator.domain.samples import sample_context
from orchestrator.scheduling.cycle import Failure
from orchestrator.sim.replay import SAME, explain, find_cycle, replay_cycle
from orchestrator.state.decision_log import DecisionLog, LoggedCycle, log_files, read_log
from tests.conftest import REPO, EngineFactory
from tests.schedulers.test_examples import over_threshold

EVICTION = (REPO / "schedulers" / "examples" / "runtime-7.4-vram-aware-eviction.lua").read_text()
ALWAYS_WAIT = 'function schedule(ctx) return {action = "wait"} end\n'
SHA_A, SHA_B = "a" * 64, "b" * 64
DISPATCHED = Dispatch("job-1", "worker-4")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def logged(
    decision: Decision = DISPATCHED,
    *,
    source: str = "user",
    sha: str = SHA_A,
    error_kind: str = "",
    error_message: str = "",
) -> LoggedCycle:
    return LoggedCycle(
        seq=7,
        context=sample_context(),
        decision=decision,
        source=source,
        error_kind=error_kind,
        latency_ms=1.0,
        wall_ms=0,
        scheduler="policy.lua" if source != "platform" else "platform",
        error_message=error_message,
        scheduler_sha256=sha,
    )


def decided(decision: Decision, *, valid: bool = True, reason: str = "") -> Diagnosis:
    return Diagnosis(
        mode="trace", file="x.lua", decision=decision, valid=valid, invalid_reason=reason
    )


# ------------------------------------------------------------------ explain (pure)


def test_same_script_same_decision_is_the_same() -> None:
    """Reasons and rules do not count: the same job on the same worker is the same."""
    out = explain(logged(), SHA_A, decided(Dispatch("job-1", "worker-4", reason="x")))
    assert out.same and out.summary == SAME
    assert out.reasons == () and out.difference is None
    assert out.text().startswith(f"cycle seq 7: {SAME}")


def test_a_changed_script_that_decides_otherwise_says_both() -> None:
    """The script's sha256 differs from the logged one: named first, then how they differ."""
    out = explain(logged(), SHA_B, decided(Dispatch("job-2", "worker-4")))
    assert not out.same and out.difference == "job"
    assert out.reasons[0].startswith("the script changed: the service ran policy.lua")
    assert f"(sha256 {SHA_A[:12]})" in out.reasons[0] and SHA_B[:12] in out.reasons[0]
    assert out.reasons[-1] == "the decisions differ in: job"
    text = out.text()
    assert "service (user, policy.lua): dispatch job-1 -> worker-4" in text
    assert "candidate: dispatch job-2 -> worker-4" in text


def test_a_changed_script_may_still_decide_the_same() -> None:
    """Same decision, but the note says the script is not the one that ran."""
    out = explain(logged(), SHA_B, decided(Dispatch("job-1", "worker-4")))
    assert out.same
    assert out.reasons[0].startswith("the script changed")
    assert "notes:" in out.text()


def test_a_fallback_cycle_names_the_user_scripts_failure_then() -> None:
    """The service executed the platform's fallback: the user's script failed then."""
    cycle = logged(
        Wait(),
        source="platform-fallback",
        error_kind="lua_error",
        error_message="boom at line 3",
    )
    out = explain(cycle, SHA_A, decided(Dispatch("job-1", "worker-4")))
    assert not out.same and out.difference == "action"
    assert (
        "the service's decision was the platform scheduler's fallback: the user's script "
        "failed then (lua_error: boom at line 3)"
    ) in out.reasons


def test_a_platform_cycle_had_no_user_script() -> None:
    out = explain(
        logged(EvictWorker("worker-3"), source="platform", sha=""),
        SHA_A,
        decided(EvictWorker("worker-3")),
    )
    assert out.same
    assert out.reasons == ("the platform scheduler was in charge then: no user script ran",)


def test_a_log_without_the_hash_says_it_cannot_tell() -> None:
    """Logs written before scheduler_sha256 was recorded."""
    out = explain(logged(sha=""), SHA_A, decided(Dispatch("job-9", "worker-4")))
    assert not out.same
    assert "does not say which script ran" in out.reasons[0]


def test_a_failing_or_rejected_candidate_says_the_service_would_fall_back() -> None:
    failing = Diagnosis(
        mode="trace", file="x.lua", error=Failure("lua_error", "attempt to index a nil value")
    )
    out = explain(logged(), SHA_A, failing)
    assert not out.same and out.candidate == "" and out.difference is None
    assert out.reasons == (
        "the candidate failed: lua_error: attempt to index a nil value (the service would "
        "fall back)",
    )
    assert "candidate: no decision" in out.text()
    rejected = decided(
        Dispatch("job-1", "worker-4"), valid=False, reason="action #0 (dispatch): busy"
    )
    out = explain(logged(), SHA_A, rejected)
    # The same decision, but rejected now: not "the same" as what the service executed.
    assert not out.same
    assert "would be rejected: action #0 (dispatch): busy" in out.reasons[0]


def test_same_script_deciding_otherwise_points_at_what_the_log_lacks() -> None:
    out = explain(logged(), SHA_A, decided(Dispatch("job-1", "worker-1")))
    assert not out.same and out.difference == "worker"
    assert "depends on something the log does not hold" in out.reasons[0]
    assert out.to_json()["reasons"] == list(out.reasons)


# ------------------------------------------------------------------ the log


async def test_the_log_records_the_sha256_of_the_lua_that_ran(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Each entry carries the active user scheduler's sha256 (of the Lua it runs); none
    while the platform scheduler is in charge; a replaced scheduler's own."""
    engine = await make_engine(EVICTION, user_name="evict.lua", user_spares=0, platform_spares=0)
    log = DecisionLog(tmp_path / "decisions", max_file_bytes=2**20, keep_files=2)
    engine.decision_log = log
    await engine.schedule(sample_context())
    await engine.replace_user(ALWAYS_WAIT, "wait.lua")
    await engine.schedule(over_threshold(sample_context()))
    await engine.replace_user(None)
    await engine.schedule(sample_context())
    log.close()
    cycles = [c for path in log_files(tmp_path / "decisions") for c in read_log(path)]
    assert [(c.scheduler, c.scheduler_sha256, c.source) for c in cycles] == [
        ("evict.lua", sha256(EVICTION), "user"),
        ("wait.lua", sha256(ALWAYS_WAIT), "user"),
        ("platform", "", "platform"),
    ]


async def _write_log(make_engine: EngineFactory, directory: Path, source: str) -> None:
    """Three cycles of `source` as the user scheduler: seqs 1 (sample), 2 (over the
    VRAM threshold), 3 (a script error: the platform's fallback)."""
    failing = 'function schedule(ctx) error("no pools today") end\n'
    engine = await make_engine(source, user_name="evict.lua", user_spares=0, platform_spares=0)
    log = DecisionLog(directory, max_file_bytes=2**20, keep_files=2)
    engine.decision_log = log
    await engine.schedule(sample_context())
    await engine.schedule(over_threshold(sample_context()))
    await engine.replace_user(failing, "evict.lua")
    await engine.schedule(sample_context())
    log.close()


async def test_find_cycle_by_seq(make_engine: EngineFactory, tmp_path: Path) -> None:
    await _write_log(make_engine, tmp_path / "decisions", EVICTION)
    cycle = find_cycle(tmp_path / "decisions", 2)
    assert cycle.seq == 2 and cycle.decision == EvictWorker(
        "worker-3", reason="vram_threshold_exceeded"
    )
    with pytest.raises(NotFoundError, match="no cycle with seq 9; it holds seqs 1 to 3"):
        find_cycle(tmp_path / "decisions", 9)
    # Logs of two runs of the service both hold seq 1: which one is meant is not guessed.
    await _write_log(make_engine, tmp_path / "decisions", EVICTION)
    with pytest.raises(ConfigError, match="seq 1 is in several log files"):
        find_cycle(tmp_path / "decisions", 1)


async def test_replay_cycle_explains_a_logged_cycle(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """The same script on its own cycle: the same decision, with the trace of it. A
    changed script, and a cycle the user's script failed on, are explained."""
    directory = tmp_path / "decisions"
    await _write_log(make_engine, directory, EVICTION)

    same, diagnosis = await replay_cycle(directory, 2, EVICTION, "evict.lua")
    assert same.same and same.reasons == ()
    assert diagnosis.mode == "trace" and diagnosis.decision == EvictWorker(
        "worker-3", reason="vram_threshold_exceeded"
    )
    assert [c.name for c in diagnosis.calls][:2] == [
        "get_pool_utilization",
        "find_worker_to_evict_lru",
    ]

    changed, _ = await replay_cycle(directory, 2, ALWAYS_WAIT, "wait.lua", instrument="profile")
    assert not changed.same and changed.difference == "action"
    assert changed.reasons[0].startswith("the script changed: the service ran evict.lua")
    assert changed.candidate == "wait"

    fell_back, _ = await replay_cycle(directory, 3, EVICTION, "evict.lua")
    assert fell_back.logged_source == "platform-fallback"
    assert any(
        "the user's script failed then (lua_error:" in r and "no pools today" in r
        for r in fell_back.reasons
    )
