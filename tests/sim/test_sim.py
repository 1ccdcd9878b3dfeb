"""Simulation: workloads, determinism, the fallback path, reports, A/B (trace formats and
conversations: test_workload.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.domain.errors import ConfigError, InvalidRequestError
from orchestrator.sim.compare import Policy, compare
from orchestrator.sim.report import headline, table, write_html
from orchestrator.sim.run import default_catalog, simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import WorkloadSpec, generate, token_range, weighted
from tests.conftest import REPO

TRACE = REPO / "tests" / "data" / "traces" / "azure-llm-inference-2023-code.csv"
EXAMPLES = REPO / "schedulers" / "examples"
PRIORITY = (EXAMPLES / "runtime-7.1-simple-priority.lua").read_text()
THROWS = 'function schedule(ctx) error("always broken") end\n'
# A decision deadline far above any cycle's: the tests below count which source decided
# each cycle, and a loaded machine must not turn a slow cycle into a fallback there.
SLACK_MS = 2000
SMALL = SimSettings(
    rate=3.0, duration_s=10.0, queue_depth=5, tenants="a:1,b:1", seed=11, deadline_ms=SLACK_MS
)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, check=False,
    )  # fmt: skip


# ---------------------------------------------------------------- workloads (pure)
def test_poisson_arrivals_follow_the_rate_and_the_seed() -> None:
    """Arrivals average the requested rate; a seed fixes them, another seed changes them."""
    spec = WorkloadSpec(rate=5.0, duration_s=200.0, seed=3)
    first = generate(spec, ("llama-8b",))
    assert 850 < len(first) < 1150
    assert all(a.at_ms <= b.at_ms for a, b in itertools.pairwise(first))
    assert generate(spec, ("llama-8b",)) == first
    assert generate(WorkloadSpec(rate=5.0, duration_s=200.0, seed=4), ("llama-8b",)) != first


def test_bursts_queue_depth_and_mixes() -> None:
    """Bursts land together, --queue-depth jobs wait at t=0, and mixes follow their weights."""
    spec = WorkloadSpec(
        rate=0.0, duration_s=10.0, burst_every_s=2.0, burst_size=7, queue_depth=4,
        tenants=(("a", 3.0), ("b", 1.0)), models=(("llama-8b", 1.0),), interactive=0.5, seed=1,
    )  # fmt: skip
    arrivals = generate(spec, ("unused",))
    at_zero = [a for a in arrivals if a.at_ms == 0]
    assert len(at_zero) == 4
    bursts = sorted({a.at_ms for a in arrivals if a.at_ms})
    assert bursts == [2000, 4000, 6000, 8000]
    assert all(sum(1 for a in arrivals if a.at_ms == t) == 7 for t in bursts)
    assert {a.model for a in arrivals} == {"llama-8b"}
    many = generate(WorkloadSpec(rate=50, duration_s=100, tenants=spec.tenants, seed=2), ("m",))
    share_a = sum(a.tenant_id == "a" for a in many) / len(many)
    assert 0.7 < share_a < 0.8
    assert generate(WorkloadSpec(jobs=25, rate=1.0), ("m",)).__len__() == 25


def test_bad_workload_options_name_the_option() -> None:
    """Mixes, ranges and unknown models fail with an error that names what is wrong."""
    with pytest.raises(ConfigError, match="tenants: 'a:x' is not NAME or NAME:WEIGHT"):
        weighted("a:x", "tenants")
    with pytest.raises(ConfigError, match="weight of 'a' must be positive"):
        weighted("a:0", "tenants")
    with pytest.raises(ConfigError, match="prompt_tokens: expected 0 < MIN <= MAX"):
        token_range("50-10", "prompt_tokens")
    with pytest.raises(ConfigError, match="'gpt-9' is not in the catalog"):
        SimSettings(models="gpt-9").arrivals(default_catalog())
    with pytest.raises(InvalidRequestError, match=r"workload\.rate: must not be negative"):
        SimSettings.from_mapping({"rate": -1})
    with pytest.raises(ConfigError, match=r"workload\.colour: unknown field"):
        SimSettings.from_mapping({"colour": "red"})


# ---------------------------------------------------------------- the simulation
async def test_same_seed_same_report_and_another_seed_differs() -> None:
    """Two runs with one seed give equal reports (wall-clock figures aside)."""
    first = await simulate(PRIORITY, "priority.lua", SMALL)
    second = await simulate(PRIORITY, "priority.lua", SMALL)
    assert first.deterministic() == second.deterministic()
    assert first.jobs_completed == first.jobs_submitted >= 30
    other = await simulate(PRIORITY, "priority.lua", SMALL.with_seed(12))
    assert other.deterministic() != first.deterministic()


async def test_a_scheduler_that_always_throws_gives_the_platform_results() -> None:
    """Every cycle of a throwing scheduler falls back, so the outcome is the platform's."""
    platform = await simulate(None, "platform", SMALL)
    broken = await simulate(THROWS, "broken.lua", SMALL)
    assert broken.fallbacks == broken.cycles == platform.cycles
    assert broken.decisions_by_source == {"platform-fallback": broken.cycles}
    # The breaker opens after 5 errors; its backoff runs on the simulated clock.
    assert broken.fallback_reasons["lua_error"] >= 5
    assert sum(broken.fallback_reasons.values()) == broken.cycles
    same = ("jobs_completed", "wait_ms", "end_to_end_ms", "decisions_by_action", "series",
            "worker_starts", "worker_evictions", "tenant_throughput", "vram_utilization")  # fmt: skip
    for key in same:
        assert getattr(broken, key) == getattr(platform, key), key
    assert platform.fallbacks == 0


async def test_priority_scheduler_serves_interactive_jobs_first() -> None:
    """Runtime-spec 7.1 on a mixed, oversubscribed workload (one slot a worker, the
    runtime spec's worker): interactive p99 wait is lower."""
    settings = SimSettings(
        rate=4.0, duration_s=40.0, interactive=0.3, seed=5, worker_slots=1, deadline_ms=SLACK_MS
    )
    report = await simulate(PRIORITY, "priority.lua", settings)
    waits = report.wait_ms["by_priority"]
    assert waits["interactive"]["count"] > 20 and waits["batch"]["count"] > 50
    assert waits["interactive"]["p99"] < waits["batch"]["p99"] / 2
    assert report.decisions_by_source == {"user": report.cycles}


async def test_workers_start_and_vram_is_accounted() -> None:
    """Queued models without a worker get one after the start delay, within the GPU's VRAM."""
    settings = SimSettings(
        pools=1, workers_per_pool=1, gpus_per_pool=1, rate=2.0, duration_s=20.0,
        models="llama-8b:1,qwen-14b:1", start_delay_ms=3000, seed=2,
    )  # fmt: skip
    report = await simulate(None, "platform", settings)
    assert report.worker_starts >= 1
    assert report.jobs_completed == report.jobs_submitted
    assert 0 < report.vram_utilization["mean"] <= report.vram_utilization["max"] <= 1.0
    # Nothing waits less than a worker start when it needs one: the qwen jobs at t<3s.
    assert report.wait_ms["all"]["p99"] >= 2000


async def test_report_html_plots_and_table(tmp_path: Path) -> None:
    """--report writes report.html with four PNG plots; the table shows every headline row."""
    report = await simulate(None, "platform", SMALL)
    page = write_html([report], tmp_path / "out", "test")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.html", "report.json", "queue_depth.png", "latency_cdf.png",
            "vram_utilization.png", "tenant_throughput.png"} <= names  # fmt: skip
    for png in (tmp_path / "out").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    html = page.read_text()
    assert 'src="latency_cdf.png"' in html and "wait p99 tenant a (ms)" in html
    text = table([report])
    for label in headline(report):
        assert label in text
    data = report.to_dict()
    assert len(data["cdf_ms"]["wait"]) == 100 and "wait_samples" not in data


@pytest.mark.slow
async def test_compare_marks_real_differences_and_not_identical_policies() -> None:
    """A/B: arrival order against priority (ctx.queue's order) differs beyond noise on
    interactive wait when jobs queue (one slot a worker); a policy against itself differs
    on nothing deterministic."""
    fifo = """function schedule(ctx)
  local jobs = {}
  for i, job in ipairs(ctx.queue) do jobs[i] = job end
  table.sort(jobs, function(a, b) return a.queued_at < b.queued_at end)
  for _, job in ipairs(jobs) do
    local w = ctx.find_ready_worker(job.model_ref)
    if w then return {action = "dispatch", job_id = job.id, worker_id = w.id} end
  end
  return {action = "wait"}
end"""
    settings = SimSettings(rate=4.0, duration_s=20.0, interactive=0.3, seed=1, worker_slots=1)
    result = await compare(Policy(fifo, "fifo"), Policy(PRIORITY, "priority"), settings)
    assert [r.seed for r, _ in result.replicates] == [1, 2, 3]
    assert result.significant.get("wait p99 interactive (ms)") == "*"
    differences = result.to_dict()["differences"]
    assert differences["wait p99 interactive (ms)"]["mean"] < 0  # type: ignore[index]
    same = await compare(Policy(None, "platform"), Policy(None, "platform (B)"), settings)
    assert not [k for k in same.significant if not k.startswith("decision latency")]


# ---------------------------------------------------------------- the CLI
def test_runtime_spec_10_3_command_runs_as_written(tmp_path: Path) -> None:
    """`scheduler simulate --file my-scheduler.lua --queue-depth 10 --pools 2
    --workers-per-pool 4` prints a report; --json gives the same run as data."""
    (tmp_path / "my-scheduler.lua").write_text(PRIORITY)
    flags = ["--file", "my-scheduler.lua", "--queue-depth", "10", "--pools", "2",
             "--workers-per-pool", "4"]  # fmt: skip
    done = cli("scheduler", "simulate", *flags, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "my-scheduler.lua" in done.stdout and "wait p99 interactive (ms)" in done.stdout
    as_json = cli("scheduler", "simulate", *flags, "--json", cwd=tmp_path)
    report = json.loads(as_json.stdout)
    assert report["cluster"]["pools"] == 2 and report["cluster"]["workers_per_pool"] == 4
    assert report["workload"]["queue_depth"] == 10
    assert report["jobs_completed"] == report["jobs_submitted"] >= 10
    assert f"{report['throughput_jobs_per_s']:.3f}" in done.stdout  # same seed, same run


def test_cli_trace_compare_and_errors(tmp_path: Path) -> None:
    """--trace replays the Azure CSV; compare prints both policies; bad flags exit 2."""
    done = cli(
        "scheduler", "simulate", "--file", "platform", "--trace", str(TRACE),
        "--trace-limit", "300", "--speedup", "20", "--trace-models",
        "2048:llama-8b,inf:qwen-14b", "--tenants", "a,b", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["jobs_submitted"] == 300 and report["workload"]["trace"] == str(TRACE)
    assert set(report["tenant_throughput"]) == {"a", "b"}
    compared = cli(
        "scheduler", "compare", "platform", str(REPO / "schedulers/templates/batch-optimized.yaml"),
        "--duration", "8", "--replicates", "2", "--report", str(tmp_path / "ab"),
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert "batch-optimized.yaml" in compared.stdout and "differs by more than" in compared.stdout
    assert (tmp_path / "ab" / "latency_cdf.png").exists()
    bad = cli("scheduler", "simulate", "--file", "platform", "--models", "gpt-9")
    assert bad.returncode == 2 and "'gpt-9' is not in the catalog" in bad.stderr
    bad = cli("scheduler", "simulate", "--file", "platform", "--pools", "0")
    assert bad.returncode == 2 and "--pools: must be at least 1, got 0" in bad.stderr


async def test_batched_workers_finish_a_burst_sooner() -> None:
    """docs/ARCHITECTURE.md D27: 24 jobs queued at once on two workers. With four slots
    each, eight run at a time, each slower (a decode step of four sequences takes longer
    than one of a single sequence) but all together faster (one step reads the weights
    once for the whole batch: docs/SIMULATION.md), so the last job ends sooner and the
    queue waits less."""
    burst = SimSettings(pools=1, workers_per_pool=2, rate=0.0, queue_depth=24,
                        models="llama-8b", seed=4, worker_slots=1)  # fmt: skip
    one = await simulate(None, "platform", burst)
    four = await simulate(None, "platform", dataclasses.replace(burst, worker_slots=4))
    assert one.jobs_completed == four.jobs_completed == 24
    assert four.cluster["worker_slots"] == 4 and "worker_slots" not in four.workload
    # Every job arrives at t=0: the p99 of 24 end-to-end times is when the last ends.
    assert four.end_to_end_ms["all"]["p99"] < one.end_to_end_ms["all"]["p99"] / 2
    assert four.wait_ms["all"]["p99"] < one.wait_ms["all"]["p99"] / 2
