"""`scheduler test --trace | --profile [--bank NAME]`, `scheduler validate --profile`
and its hot lines, and `scheduler replay --seq N`, run as the real commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.context_file import context_to_dict
from orchestrator.debugging.diagnose import TIMES
from orchestrator.domain.samples import sample_context
from orchestrator.policy.validate import BANK, LARGEST_BANK_CONTEXT, bank
from orchestrator.state.decision_log import DecisionLog
from tests.conftest import REPO, EngineFactory
from tests.schedulers.test_examples import over_threshold

EXAMPLES = REPO / "schedulers" / "examples"
EVICTION = EXAMPLES / "runtime-7.4-vram-aware-eviction.lua"
DETERMINISM = EXAMPLES / "runtime-7.3-determinism-first.lua"
ERROR = EXAMPLES / "runtime-8.1-error.lua"
# Fast on small contexts, slow on 10,000 jobs: a line runs once per queued job.
PER_JOB = """\
function schedule(ctx)
  local q = ctx.queue
  local total = 0
  for i = 1, #q do
    total = total + #string.rep("x", 64 + i % 7) + #string.format("%d:%d", i, total)
  end
  return { action = "wait" }
end
"""


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_trace_prints_the_lines_that_ran_their_calls_and_the_decision() -> None:
    """runtime-spec 7.4 on the sample context, traced."""
    proc = run("scheduler", "test", "--file", str(EVICTION), "--trace")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    name = re.escape(EVICTION.name)
    assert out.startswith(f"trace of {EVICTION.name}: ")
    # Two pools: the loop's line runs three times (twice into the body, once to leave).
    assert re.search(rf"^{name}:3 +{TIMES}3 +  for _, pool in ipairs\(ctx\.pools\) do$", out, re.M)
    assert re.search(rf"^{name}:6 +{TIMES}2 +    if utilization > 0\.9 then$", out, re.M)
    assert '→ ctx.get_pool_utilization("pool-1") = 0.476562' in out
    assert '→ ctx.get_pool_utilization("pool-2") = 0.2' in out
    assert '→ ctx.find_least_loaded_worker("llama-8b") = {id="worker-4"' in out
    assert "decision: dispatch job-1 -> worker-4 (valid)" in out
    assert "within the 50 ms deadline" in out
    # The eviction branch never ran.
    assert f"{EVICTION.name}:8 " not in out


def test_trace_json_is_the_diagnosis(tmp_path: Path) -> None:
    """--json prints Diagnosis.to_json(); --context works as without --trace."""
    context = tmp_path / "over.json"
    context.write_text(json.dumps(context_to_dict(over_threshold(sample_context()))))
    proc = run("scheduler", "test", "--file", str(EVICTION), "--trace", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == "trace" and out["ok"] and out["valid"]
    assert out["decision"] == {"action": "dispatch", "job_id": "job-1", "worker_id": "worker-4"}
    assert out["decision_text"] == "dispatch job-1 -> worker-4"
    assert [(c["name"], c["args"]) for c in out["calls"]] == [
        ("get_pool_utilization", '"pool-1"'),
        ("get_pool_utilization", '"pool-2"'),
        ("find_least_loaded_worker", '"llama-8b"'),
    ]
    assert out["lines"][0] == {
        "line": 3, "count": 3, "self_ms": 0.0, "text": "  for _, pool in ipairs(ctx.pools) do",
    }  # fmt: skip
    assert out["deadline_ms"] == 50 and out["met_deadline"] is True
    proc = run("scheduler", "test", "--file", str(EVICTION), "--trace", "--context", str(context))
    assert proc.returncode == 0, proc.stderr
    assert "decision: evict_worker worker-3 (vram_threshold_exceeded) (valid)" in proc.stdout
    assert "[warn] Pool pool-1 over threshold, evicting worker: worker-3" in proc.stdout


def test_a_failing_script_under_trace_exits_3_with_its_error() -> None:
    proc = run("scheduler", "test", "--file", str(ERROR), "--trace", "--json")
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False and out["decision"] is None
    assert out["error"]["kind"] == "lua_error"
    assert "Something went wrong!" in out["error"]["message"]


def test_a_bank_context_by_name() -> None:
    """--bank takes a validation-bank context, with or without --trace."""
    proc = run("scheduler", "test", "--file", str(EVICTION), "--bank", "all-busy")
    assert proc.returncode in (0, 3), proc.stderr
    assert "context:  5 queued jobs" in proc.stdout
    proc = run("scheduler", "test", "--file", str(EVICTION), "--bank", "empty-queue", "--trace")
    assert proc.returncode == 0, proc.stderr
    assert "decision: wait (valid)" in proc.stdout


def test_the_bank_names_are_the_banks_and_the_largest_is_10k() -> None:
    contexts = bank()
    assert [label for label, _ in contexts] == list(BANK)
    largest = max(contexts, key=lambda c: len(c[1].queue))
    assert largest[0] == LARGEST_BANK_CONTEXT == "10k-jobs"
    assert len(largest[1].queue) == 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "--profile"], "not allowed with argument"),
        (["--bank", "nope"], "invalid choice: 'nope'"),
        (["--bank", "sample", "--context", "x.yaml"], "not allowed with argument"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    proc = run("scheduler", "test", "--file", str(EVICTION), *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_replay_trace_without_seq_is_bad_usage(tmp_path: Path) -> None:
    proc = run(
        "scheduler", "replay", "--log", str(tmp_path), "--file", str(EVICTION), "--trace"
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--trace and --profile explain one cycle: give its --seq" in proc.stderr


@pytest.mark.slow
def test_profile_on_the_10k_bank_context() -> None:
    """runtime-spec 7.3 on 10,000 jobs: the filter_jobs predicate is the hottest line."""
    proc = run(
        "scheduler", "test", "--file", str(DETERMINISM), "--profile", "--bank", "10k-jobs"
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"profile of {DETERMINISM.name}: median of 5 profiled runs")
    assert lines[1] == "hottest lines (self time):"
    assert re.match(
        rf" +{re.escape(DETERMINISM.name)}:4 +{TIMES}\d+ .* return job\.seed ~= nil$", lines[2]
    )
    assert re.search(
        rf"^profiled run [\d.]+ ms vs [\d.]+ ms plain \([\d.]+{TIMES}\)", proc.stdout, re.M
    )
    assert "ctx.filter_jobs" in proc.stdout
    assert re.search(r"^decision: batch of \d+: .*; … \d+ more \(valid\)$", proc.stdout, re.M)


@pytest.mark.slow
def test_validate_profile_profiles_the_largest_bank_context(tmp_path: Path) -> None:
    policy = tmp_path / "per-job.lua"
    policy.write_text(PER_JOB)
    proc = run("scheduler", "validate", str(policy), "--profile", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"profile on the {LARGEST_BANK_CONTEXT} bank context:" in proc.stdout
    assert re.search(rf"per-job\.lua:5 +{TIMES}10000 ", proc.stdout)
    assert "hottest lines on" not in proc.stdout  # the speed check passed
    proc = run("scheduler", "validate", str(policy), "--profile", "--json", timeout=300)
    out = json.loads(proc.stdout)
    assert out["ok"] and "hot_lines" not in out["speed"]
    assert out["profile"]["mode"] == "profile"
    assert {line["line"]: line["count"] for line in out["profile"]["lines"]}[5] == 10_000


@pytest.mark.slow
def test_a_failed_speed_check_lists_the_hottest_lines_unasked(tmp_path: Path) -> None:
    """A budget the 10,000-job context cannot meet: the report names the lines to blame."""
    policy = tmp_path / "per-job.lua"
    policy.write_text(PER_JOB)
    proc = run("scheduler", "validate", str(policy), "--deadline-ms", "1", "--json", timeout=300)
    assert proc.returncode == 1, proc.stderr
    speed = json.loads(proc.stdout)["speed"]
    assert not speed["ok"] and speed["profiled_context"] == "10k-jobs"
    hot = speed["hot_lines"]
    assert 0 < len(hot) <= 5
    assert hot[0]["line"] == 5 and hot[0]["count"] == 10_000
    assert hot[0]["text"].strip().startswith("total = total + #string.rep")
    assert [h["self_ms"] for h in hot] == sorted((h["self_ms"] for h in hot), reverse=True)
    proc = run("scheduler", "validate", str(policy), "--deadline-ms", "1", timeout=300)
    assert "hottest lines on 10k-jobs (profiled):" in proc.stdout
    assert re.search(rf"per-job\.lua:5 +{TIMES}10000 +[\d.]+ ms  total = total", proc.stdout)


@pytest.mark.slow
async def test_replay_seq_explains_a_logged_cycle(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """The service's log, a cycle of it by seq: the same script decides the same; an
    edited one is named as changed, with both decisions."""
    engine = await make_engine(
        EVICTION.read_text(), user_name=EVICTION.name, user_spares=0, platform_spares=0
    )
    log = DecisionLog(tmp_path / "decisions", max_file_bytes=2**20, keep_files=2)
    engine.decision_log = log
    await engine.schedule(sample_context())
    await engine.schedule(over_threshold(sample_context()))
    log.close()
    directory = str(tmp_path / "decisions")

    proc = run("scheduler", "replay", "--log", directory, "--file", str(EVICTION), "--seq", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cycle seq 2: same decision as the service made\n")
    assert "service (user, runtime-7.4-vram-aware-eviction.lua): evict_worker worker-3" in (
        proc.stdout
    )
    assert '→ ctx.find_worker_to_evict_lru("pool-1") = {id="worker-3"' in proc.stdout

    edited = tmp_path / "edited.lua"
    edited.write_text(EVICTION.read_text().replace("> 0.9", "> 0.99"))
    proc = run(
        "scheduler", "replay", "--log", directory, "--file", str(edited), "--seq", "2",
        "--profile", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    explanation = out["explanation"]
    assert explanation["same"] is False and explanation["difference"] == "action"
    assert explanation["reasons"][0].startswith("the script changed: the service ran")
    assert explanation["logged"] == "evict_worker worker-3 (vram_threshold_exceeded)"
    assert explanation["candidate"] == "dispatch job-1 -> worker-4"
    assert out["mode"] == "profile" and out["decision_text"] == "dispatch job-1 -> worker-4"

    proc = run("scheduler", "replay", "--log", directory, "--file", str(EVICTION), "--seq", "9")
    assert proc.returncode == 2
    assert "no cycle with seq 9; it holds seqs 1 to 2" in proc.stderr
