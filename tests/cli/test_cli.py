"""`orchestratord scheduler test --dry-run`, run as the real command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.sim import load_policy
from tests.conftest import REPO

EXAMPLES = REPO / "schedulers" / "examples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dry_run_prints_decision_source_logs_and_latency() -> None:
    """The human output names the decision, its source, the script's logs and the latency."""
    proc = run(
        "scheduler",
        "test",
        "--file",
        str(EXAMPLES / "runtime-7.3-determinism-first.lua"),
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    assert "source:   user" in proc.stdout
    assert "decision: dispatch job-1 -> worker-1" in proc.stdout
    assert "[info] Dispatching deterministic job: job-1 (seed: 42)" in proc.stdout
    assert "latency:" in proc.stdout


def test_json_output_has_the_documented_keys() -> None:
    """--json prints one object with decision, source, error, logs, metrics and latency_ms."""
    proc = run(
        "scheduler",
        "test",
        "--file",
        str(EXAMPLES / "runtime-2-entry-point.lua"),
        "--dry-run",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"decision", "source", "error", "logs", "metrics", "latency_ms"}
    assert out["decision"] == {"action": "dispatch", "job_id": "job-1", "worker_id": "worker-4"}
    assert out["source"] == "user" and out["error"] is None
    assert out["latency_ms"] > 0


def test_fallback_exits_3_with_the_reason() -> None:
    """A scheduler that fails exits 3 and reports the fallback reason and traceback."""
    proc = run("scheduler", "test", "--file", str(EXAMPLES / "runtime-8.1-error.lua"), "--json")
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert out["source"] == "platform-fallback"
    assert out["error"]["kind"] == "lua_error"
    assert "Something went wrong!" in out["error"]["message"]
    assert "stack traceback" in out["error"]["traceback"]
    assert out["decision"]["action"] == "batch"


def test_logs_and_metrics_in_json(tmp_path: Path) -> None:
    """ctx.log_* and ctx.emit_metric appear in the JSON output."""
    script = tmp_path / "s.lua"
    script.write_text(
        'function schedule(ctx) ctx.log_warn("hot") ctx.emit_metric("custom_depth", #ctx.queue)'
        ' return { action = "wait", reason = "testing", retry_after_ms = 250 } end'
    )
    out = json.loads(run("scheduler", "test", "--file", str(script), "--json").stdout)
    assert out["logs"] == [{"level": "warn", "message": "hot"}]
    assert out["metrics"] == [{"name": "custom_depth", "value": 5.0}]
    assert out["decision"] == {"action": "wait", "retry_after_ms": 250, "reason": "testing"}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_context_file_round_trip(tmp_path: Path, suffix: str) -> None:
    """sample-context output, edited, feeds --context; the script sees the edit."""
    proc = run("scheduler", "sample-context", *(["--json"] if suffix == ".json" else []))
    data = json.loads(proc.stdout) if suffix == ".json" else yaml.safe_load(proc.stdout)
    data["queue"] = data["queue"][1:2]  # keep only job-4
    path = tmp_path / f"ctx{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    script = tmp_path / "s.lua"
    script.write_text(
        'function schedule(ctx) ctx.log_info(#ctx.queue, ctx.queue[1].id) return {action="wait"} end'
    )
    out = json.loads(
        run("scheduler", "test", "--file", str(script), "--context", str(path), "--json").stdout
    )
    assert out["logs"] == [{"level": "info", "message": "1 job-4"}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scheduler", "test", "--file", "/nonexistent.lua"], "No such file"),
        (["scheduler", "test"], "--file"),
        (["scheduler", "test", "--file", "x.lua", "--language", "python"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    """A missing file, a missing flag or a bad choice is a usage error with exit status 2."""
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bad_context_file_names_the_field(tmp_path: Path) -> None:
    """A context with a wrong field exits 2 and says which field."""
    path = tmp_path / "ctx.yaml"
    path.write_text("queue:\n  - id: job-1\n    model_ref: m\n    max_tokens: lots\n")
    proc = run(
        "scheduler",
        "test",
        "--file",
        str(EXAMPLES / "runtime-2-entry-point.lua"),
        "--context",
        str(path),
    )
    assert proc.returncode == 2
    assert "ctx.yaml.queue[0].max_tokens: expected int, got str" in proc.stderr


def test_lua54_runtime_selectable() -> None:
    """--language lua54 runs the same scheduler on Lua 5.4."""
    proc = run(
        "scheduler",
        "test",
        "--file",
        str(EXAMPLES / "runtime-7.1-simple-priority.lua"),
        "--language",
        "lua54",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["decision"]["job_id"] == "job-1"


def test_platform_source_command_prints_platform_lua() -> None:
    """`scheduler platform-source` prints schedulers/platform.lua."""
    proc = run("scheduler", "platform-source")
    assert proc.stdout == (REPO / "schedulers" / "platform.lua").read_text()


def test_a_template_name_stands_for_its_file_where_no_such_file_exists(tmp_path: Path) -> None:
    """`scheduler compare platform cache-aware` names the template; a file of that name
    in the working directory would win, and an unknown name is a clear error."""
    policy = load_policy("cache-aware")
    assert policy.name == "cache-aware"
    assert policy.lua == (REPO / "schedulers" / "templates" / "cache-aware.lua").read_text()
    assert load_policy("platform").lua is None
    done = run("scheduler", "simulate", "--file", "no-such-template", "--jobs", "1")
    assert done.returncode != 0 and "no-such-template" in done.stderr
