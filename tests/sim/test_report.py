"""The simulation report: TTFT, TPOT, the prefix-cache hit rate, tokens per GPU, what a
run left unfinished and why, and how they show in the table, JSON, HTML and A/B."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from orchestrator.domain.context import Config
from orchestrator.sim.cluster import SimCluster, SimJob
from orchestrator.sim.compare import Policy, compare, paired_differences, significant
from orchestrator.sim.report import (
    SimReport,
    build_report,
    headline,
    percentiles,
    table,
    time_mean,
    write_html,
)
from orchestrator.sim.run import default_catalog, simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import Arrival
from tests.conftest import REPO

TRACE = REPO / "tests" / "data" / "traces" / "azure-llm-inference-2023-code.csv"
ALWAYS_WAIT = 'function schedule(ctx) return {action = "wait"} end\n'


def cluster_with_two_gpus() -> tuple[SimCluster, dict[int, str]]:
    """One pool, two GPUs, a llama-8b worker on each; the worker id by GPU."""
    settings = SimSettings(pools=1, workers_per_pool=2, gpus_per_pool=2)
    cluster = SimCluster(settings.cluster(), default_catalog(), Config())
    cluster.build(["llama-8b"])
    return cluster, {w.gpu: w.id for w in cluster.workers.values()}


def job(
    cluster: SimCluster,
    arrival: Arrival,
    *,
    dispatched: int = -1,
    first: int = -1,
    done: int = -1,
    worker: str = "",
    cached: int = 0,
    admitted: int | None = None,
) -> SimJob:
    """A job that arrived, put in the state given (as the cluster would leave it); it
    was admitted when dispatched unless `admitted` says otherwise."""
    cluster.arrive(arrival, arrival.at_ms)
    entry = cluster.jobs[arrival.job_id]
    entry.dispatched_ms, entry.first_token_ms, entry.done_ms = dispatched, first, done
    entry.admitted_ms = dispatched if admitted is None else admitted
    entry.worker, entry.cached_tokens = worker, cached
    return entry


def arrival(job_id: str, at: int, priority: str, tenant: str | None, prompt: int, output: int,
            model: str = "llama-8b") -> Arrival:  # fmt: skip
    return Arrival(at, job_id, model, priority, tenant, prompt, output)


def report_of(cluster: SimCluster, arrivals: list[Arrival], **kwargs: object) -> SimReport:
    fields: dict[str, object] = {
        "policy": "p", "seed": 1, "workload": {}, "cluster": cluster.spec,
        "cluster_state": cluster, "arrivals": arrivals, "end_ms": 10_000, "latencies": [1.0],
        "sources": Counter({"user": 1}), "actions": Counter(), "rules": Counter(),
        "fallback_reasons": Counter(), "queue_series": [(0, 0)], "vram_series": [(0, 0.5)],
        "wall_s": 0.1,
    }  # fmt: skip
    return build_report(**(fields | kwargs))  # type: ignore[arg-type]


def test_percentiles_are_nearest_ranks() -> None:
    """The q-th percentile is the smallest value that a share q of the values do not
    exceed: ordered[ceil(q * n) - 1]."""
    stats = percentiles([float(v) for v in range(1, 101)])
    assert stats == {"count": 100, "p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0,
                     "mean": 50.5}  # fmt: skip
    assert percentiles([3.0, 1.0, 2.0]) | {"mean": 0} == {
        "count": 3, "p50": 2.0, "p90": 3.0, "p95": 3.0, "p99": 3.0, "mean": 0}  # fmt: skip
    assert percentiles([7.0])["p50"] == percentiles([7.0])["p99"] == 7.0
    # 0.57 * 100 is 56.99999999999999 and 0.07 * 100 is 7.000000000000001 in floats.
    assert percentiles([float(v) for v in range(1, 1001)])["p99"] == 990.0
    assert percentiles([])["p90"] == 0.0


def test_ttft_tpot_hit_rate_and_tokens_per_gpu_from_the_jobs() -> None:
    """TTFT of every job with a first token (running ones too), TPOT of finished jobs of
    two tokens or more, the hit rate over admitted prompts, and output tokens per GPU
    per simulated second, a worker gone by the end counted where it ran."""
    cluster, on_gpu = cluster_with_two_gpus()
    arrivals = [
        arrival("j1", 0, "interactive", "a", 1000, 11),
        arrival("j2", 1000, "batch", "b", 200, 1),
        arrival("j3", 2000, "batch", "a", 300, 40),
        arrival("j4", 3000, "interactive", None, 5000, 10),
        arrival("j5", 500, "batch", "b", 500, 5),
    ]
    job(cluster, arrivals[0], dispatched=100, first=300, done=1300, worker=on_gpu[0], cached=512)
    job(cluster, arrivals[1], dispatched=1000, first=1100, done=1100, worker=on_gpu[1])
    job(cluster, arrivals[2], dispatched=2000, first=2500, worker=on_gpu[1], cached=288)
    job(cluster, arrivals[3])  # still queued: in no figure
    # Dispatched, still waiting inside its worker for KV room: not in the hit rate.
    job(cluster, arrival("j6", 3000, "batch", "a", 4000, 10), dispatched=3000, admitted=-1,
        worker=on_gpu[1])  # fmt: skip
    # Finished on a worker evicted since, with no first token timed: no TTFT, no TPOT.
    job(cluster, arrivals[4], dispatched=600, done=900, worker="pool-1-gone")
    report = report_of(cluster, arrivals, placements={"pool-1-gone": ("pool-1", 0)})

    assert report.ttft_ms["all"] == {"count": 3, "p50": 300.0, "p90": 500.0, "p95": 500.0,
                                     "p99": 500.0, "mean": 300.0}  # fmt: skip
    assert report.ttft_ms["by_priority"]["batch"]["count"] == 2
    assert report.ttft_ms["by_tenant"]["a"]["p99"] == 500.0
    assert report.ttft_samples == [100.0, 300.0, 500.0]
    assert report.tpot_samples == [100.0]  # (1300 - 300) / (11 - 1)
    assert report.prefix_cache == {"hit_rate": 0.4, "cached_tokens": 800, "prompt_tokens": 2000}
    per_gpu = report.output_tokens_per_s_per_gpu
    assert per_gpu == {"mean": 0.85, "by_gpu": {"pool-1/0": 1.6, "pool-1/1": 0.1}}

    figures = headline(report)
    assert figures["TTFT p90 (ms)"] == 500.0 and figures["TPOT p99 (ms)"] == 100.0
    assert figures["TTFT p99 interactive (ms)"] == 300.0
    assert figures["prefix-cache hit rate"] == 0.4
    assert figures["output tokens/s per GPU"] == 0.85
    data = report.to_dict()
    assert len(data["cdf_ms"]["ttft"]) == 100 and data["cdf_ms"]["tpot"][-1] == 100.0
    assert "ttft_samples" not in data
    text = table([report])
    assert "TTFT p50 (ms)" in text and "pool-1/0 1.6, pool-1/1 0.1" in text


def test_first_tokens_not_timed_leave_ttft_out() -> None:
    """A cluster that leaves first_token_ms at -1: no TTFT or TPOT samples, no such rows."""
    cluster, on_gpu = cluster_with_two_gpus()
    arrivals = [arrival("j1", 0, "batch", None, 100, 10)]
    job(cluster, arrivals[0], dispatched=0, done=500, worker=on_gpu[0])
    report = report_of(cluster, arrivals)
    assert report.ttft_ms["all"]["count"] == report.tpot_ms["all"]["count"] == 0
    assert not [label for label in headline(report) if label.startswith(("TTFT", "TPOT"))]
    assert report.to_dict()["cdf_ms"]["ttft"] == []
    assert report.unfinished["stopped"] == "finished" and report.unfinished["count"] == 0


def test_unfinished_jobs_are_counted_by_reason_with_examples(tmp_path: Path) -> None:
    """Queued with no worker for its model, with no free slot on one, or by a free slot
    because the policy waited (or failed), running at the limit, or not arrived when a
    cycle budget stopped the run."""
    cluster, on_gpu = cluster_with_two_gpus()
    arrivals = [
        arrival("q1", 0, "batch", None, 100, 10, model="qwen-14b"),
        arrival("q2", 0, "batch", None, 100, 10, model="qwen-14b"),
        arrival("w1", 0, "batch", None, 100, 10),
        arrival("r1", 0, "batch", None, 100, 10),
        arrival("d1", 0, "batch", None, 100, 10),
        arrival("late", 9000, "batch", None, 100, 10),
    ]
    for a in arrivals[:3]:
        job(cluster, a)
    job(cluster, arrivals[3], dispatched=0, first=50, worker=on_gpu[0])
    job(cluster, arrivals[4], dispatched=0, first=50, done=90, worker=on_gpu[0])
    report = report_of(cluster, arrivals, stopped="drain_limit", drain_limit_s=600.0,
                       last_source="user")  # fmt: skip
    u = report.unfinished
    assert u["stopped"] == "drain_limit" and u["at_ms"] == 10_000 and u["count"] == 5
    assert u["by_reason"] == {"not_arrived": 1, "queued_no_worker": 2,
                              "queued_policy_waited": 1, "running": 1}  # fmt: skip
    assert u["examples"]["queued_no_worker"] == ["q1", "q2"]
    assert u["examples"]["not_arrived"] == ["late"]
    assert report.jobs_unfinished == u["count"]
    text = table([report])
    assert "5 unfinished, stopped at the drain limit, 600 s after the last arrival" in text
    assert "queued, no worker serves its model 2 (e.g. q1, q2)" in text
    failed = report_of(cluster, arrivals, stopped="drain_limit", last_source="wait-fallback")
    assert failed.unfinished["examples"]["queued_scheduler_failed"] == ["w1"]
    # A cycle budget stopped the run: no cycle decided the job by the free slot.
    budget = report_of(cluster, arrivals, stopped="cycle_budget", last_source="user")
    assert budget.unfinished["examples"]["queued_not_decided"] == ["w1"]
    assert "queued_policy_waited" not in budget.unfinished["by_reason"]
    assert "queued by a free slot when the cycle budget stopped the run 1" in table([budget])
    for worker in cluster.workers.values():
        worker.status = "busy"
    full = report_of(cluster, arrivals, stopped="drain_limit", last_source="wait-fallback")
    assert full.unfinished["examples"]["queued_no_slot"] == ["w1"]
    page = write_html([report], tmp_path, "drained").read_text()
    assert "<h2>Unfinished jobs</h2>" in page and "running, dispatched but not done 1" in page


def test_html_plots_ttft_cdfs_a_against_b(tmp_path: Path) -> None:
    """The TTFT CDF is a fifth plot, every report on it; a comparison's note is shown."""
    cluster, on_gpu = cluster_with_two_gpus()
    arrivals = [arrival(f"j{i}", i * 100, "batch", None, 100, 10) for i in range(20)]
    for i, came in enumerate(arrivals):
        job(cluster, came, dispatched=came.at_ms, first=came.at_ms + 10 * i,
            done=came.at_ms + 500, worker=on_gpu[i % 2])  # fmt: skip
    a, b = report_of(cluster, arrivals), report_of(cluster, arrivals, policy="q")
    page = write_html([a, b], tmp_path, "a against b", {"cycles": "*"}, note="seeds 1, 2")
    png = tmp_path / "ttft_cdf.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    html = page.read_text()
    assert 'src="ttft_cdf.png"' in html and "<p>seeds 1, 2</p>" in html


def test_compare_tests_ttft_tpot_and_the_hit_rate() -> None:
    """The headline figures comparisons test carry TTFT, TPOT and the hit rate: a
    consistent TTFT difference across replicates is marked."""
    cluster, on_gpu = cluster_with_two_gpus()
    arrivals = [arrival(f"j{i}", i * 100, "batch", None, 100, 10) for i in range(10)]
    for a in arrivals:
        job(cluster, a, dispatched=a.at_ms, done=a.at_ms + 500, worker=on_gpu[0], cached=50)
    pairs = []
    for shift in (100, 110, 95):  # B's first tokens come this much later than A's
        reports = []
        for delay in (50, 50 + shift):
            for a in arrivals:
                cluster.jobs[a.job_id].first_token_ms = a.at_ms + delay
            reports.append(report_of(cluster, arrivals))
        pairs.append((reports[0], reports[1]))
    marked = significant(pairs)
    assert {"TTFT p50 (ms)", "TTFT p90 (ms)", "TTFT p99 (ms)"} <= marked.keys()
    differences = paired_differences(pairs)
    assert differences["prefix-cache hit rate"]["mean"] == 0.0
    assert {"TPOT p50 (ms)", "TPOT p99 (ms)"} <= marked.keys()  # later first tokens


def test_vram_mean_is_weighted_by_time() -> None:
    assert time_mean([(0, 0.5), (1000, 1.0)], 4000) == 0.875
    assert time_mean([(0, 0.25)], 0) == 0.25


# ---------------------------------------------------------------- whole simulations
async def test_a_simulation_times_first_tokens() -> None:
    """The simulated workers time each first token: TTFT for every finished job, within
    its end-to-end time, and TPOT for those of two tokens or more."""
    settings = SimSettings(rate=3.0, duration_s=10.0, queue_depth=5, tenants="a:1,b:1", seed=11)
    report = await simulate(None, "platform", settings)
    assert report.ttft_ms["all"]["count"] == report.jobs_completed == report.jobs_submitted
    assert report.ttft_samples[0] > 0
    assert report.ttft_ms["all"]["p99"] <= report.end_to_end_ms["all"]["p99"]
    assert report.tpot_ms["all"]["count"] > 0 and report.tpot_samples[0] > 0
    assert set(report.ttft_ms["by_tenant"]) == {"a", "b"}
    assert 0.0 <= report.prefix_cache["hit_rate"] <= 1.0
    assert report.output_tokens_per_s_per_gpu["mean"] > 0
    assert report.unfinished == {"stopped": "finished", "at_ms": report.unfinished["at_ms"],
                                 "drain_limit_s": 600.0, "count": 0, "by_reason": {},
                                 "examples": {}}  # fmt: skip


async def test_a_policy_that_never_dispatches_is_drained_and_explained() -> None:
    """The run stops `drain_limit_s` after the last arrival; the report says every job
    is queued because the policy waited, and the simulated span ends at the limit."""
    settings = SimSettings(rate=0.0, queue_depth=3, models="llama-8b", drain_limit_s=2.0)
    report = await simulate(ALWAYS_WAIT, "wait.lua", settings)
    assert report.simulated_s == 2.0 and report.jobs_completed == 0
    assert report.unfinished["stopped"] == "drain_limit"
    assert report.unfinished["by_reason"] == {"queued_policy_waited": 3}
    assert report.unfinished["examples"]["queued_policy_waited"] == [
        "sim-000000", "sim-000001", "sim-000002"]  # fmt: skip


async def test_a_run_ends_when_its_last_job_does_not_at_a_stale_event() -> None:
    """One slot a worker, two workers sharing a GPU: the long job's worker is re-planned
    when the short job ends, and its earlier plan (a `batch` event at a later time) is
    superseded. The run ends when the long job does, well before the drain limit: it
    finished, and its simulated time (which the rates divide by) is that instant."""
    settings = SimSettings(pools=1, workers_per_pool=2, gpus_per_pool=1, worker_slots=1,
                           drain_limit_s=20.0)  # fmt: skip
    arrivals = [arrival("long", 0, "batch", None, 100, 2000),
                arrival("short", 0, "batch", None, 100, 100)]  # fmt: skip
    report = await simulate(None, "platform", settings, arrivals=arrivals)
    assert report.jobs_completed == 2
    assert report.unfinished["stopped"] == "finished"
    last_done = max(report.e2e_samples)  # both arrived at 0
    assert report.simulated_s * 1000 == report.unfinished["at_ms"] == last_done < 20_000
    assert report.tokens_per_s == round(2100 / report.simulated_s, 2)
    # Past the drain limit the long job is left running, and the run lasted to the limit.
    short = await simulate(None, "platform", dataclasses.replace(settings, drain_limit_s=5.0),
                           arrivals=arrivals)  # fmt: skip
    assert short.unfinished["stopped"] == "drain_limit" and short.simulated_s == 5.0
    assert short.unfinished["by_reason"] == {"running": 1}


async def test_compare_on_a_trace_runs_each_distinct_workload_once() -> None:
    """On a trace, seeds draw only priorities and tenants: with nothing to draw, the
    replicates are one workload, run once and marked nowhere; with priorities drawn, each
    seed is a replicate and the noise says what it varies."""
    trace = SimSettings(trace=str(TRACE), trace_limit=60, speedup=20.0, interactive=0.0)
    same = await compare(Policy(None, "platform"), Policy(None, "platform (B)"), trace)
    assert len(same.replicates) == 1 and same.significant == {}
    assert same.noise.startswith("one distinct workload (seed 1)")
    drawn = dataclasses.replace(trace, interactive=0.5)
    result = await compare(Policy(None, "platform"), Policy(None, "platform (B)"), drawn,
                           replicates=2)  # fmt: skip
    assert [a.seed for a, _ in result.replicates] == [1, 2]
    assert "the seeds draw only which requests are interactive" in result.noise
    assert result.to_dict()["noise"] == result.noise
