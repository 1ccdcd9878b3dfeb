"""The simulation report: computed from a finished run, shown as a table, JSON, or an
HTML page with PNG plots.

Latencies are per job, in simulated ms: wait (arrival to dispatch) and end-to-end
(arrival to done) of the finished jobs; TTFT (arrival to the first output token) of the
jobs whose first token came; TPOT ((done - first token) / (output tokens - 1)) of the
finished jobs of two tokens or more. A cluster that does not time first tokens leaves
`first_token_ms` at -1: TTFT and TPOT then have no samples and are left out of the
headline figures.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sim.cluster import ClusterSpec, SimCluster, SimJob
from orchestrator.sim.workload import Arrival

SERIES_POINTS = 400  # time series are thinned to this many points in reports
EXAMPLES = 5  # job ids shown for each reason a job was left unfinished
GPUS_LISTED = 16  # GPUs named in the text table's tokens/s line (JSON has them all)
# Why a job was left unfinished, by reason key (report.unfinished["by_reason"]).
UNFINISHED = {
    "not_arrived": "not arrived when the run stopped",
    "queued_no_worker": "queued, no worker serves its model",
    "queued_no_slot": "queued, no worker of its model had a free slot",
    "queued_policy_waited": "queued, the policy left it waiting by a free slot",
    "queued_scheduler_failed": "queued, the scheduler failed (its last cycle fell back)",
    "queued_not_decided": "queued by a free slot when the cycle budget stopped the run",
    "running": "running, dispatched but not done",
}
FALLBACK_SOURCES = frozenset({"platform-fallback", "wait-fallback"})


def percentiles(values: list[float]) -> dict[str, float]:
    """count, p50, p90, p95, p99 and mean of `values`; zeros for none. A percentile is
    the nearest rank: the smallest value that at least that share of the values do not
    exceed, `ordered[ceil(q * n) - 1]` (the p50 of 1..100 is 50, its p99 99)."""
    if not values:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        rank = math.ceil(round(q * len(ordered), 9))  # round: 0.07 * 100 is 7.000000000000001
        return round(ordered[max(0, rank - 1)], 3)

    return {
        "count": len(ordered),
        "p50": at(0.5),
        "p90": at(0.9),
        "p95": at(0.95),
        "p99": at(0.99),
        "mean": round(sum(ordered) / len(ordered), 3),
    }


def quantiles(ordered: list[float], points: int = 100) -> list[float]:
    """The 1/points .. 100% quantiles of sorted samples."""
    if not ordered:
        return []
    return [
        ordered[min(len(ordered) - 1, (i * len(ordered)) // points)] for i in range(1, points + 1)
    ]


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one takes everything."""
    if not values or not any(values):
        return 1.0
    return round(sum(values) ** 2 / (len(values) * sum(v * v for v in values)), 4)


def thin(series: list[tuple[int, float]], points: int = SERIES_POINTS) -> list[tuple[int, float]]:
    if len(series) <= points:
        return series
    step = len(series) / points
    return [series[int(i * step)] for i in range(points)]


def time_mean(series: list[tuple[int, float]], end_ms: int) -> float:
    """The mean over [first time, end_ms] of a step function given by its changes."""
    if not series:
        return 0.0
    span = end_ms - series[0][0]
    if span <= 0:
        return series[-1][1]
    total = 0.0
    for (t, value), (next_t, _) in itertools.pairwise([*series, (end_ms, 0.0)]):
        total += value * (min(next_t, end_ms) - min(t, end_ms))
    return total / span


@dataclass
class SimReport:
    policy: str
    seed: int
    workload: dict[str, Any]
    cluster: dict[str, Any]
    jobs_submitted: int
    jobs_completed: int
    jobs_unfinished: int
    simulated_s: float
    throughput_jobs_per_s: float
    tokens_per_s: float
    wait_ms: dict[str, Any]
    end_to_end_ms: dict[str, Any]
    fairness_jain: float
    vram_utilization: dict[str, float]
    worker_starts: int
    worker_evictions: int
    cycles: int
    decisions_by_action: dict[str, int]
    decisions_by_rule: dict[str, int]
    decisions_by_source: dict[str, int]
    fallbacks: int
    timeouts: int
    fallback_reasons: dict[str, int]
    decision_latency_ms: dict[str, float]
    wall_s: float
    tenant_throughput: dict[str, float] = field(default_factory=dict)
    # Breakdowns like wait_ms: {"all", "by_priority", "by_tenant"} of percentiles().
    ttft_ms: dict[str, Any] = field(default_factory=dict)
    tpot_ms: dict[str, Any] = field(default_factory=dict)
    # Prompt tokens of the jobs admitted to a batch, and those their workers had cached.
    prefix_cache: dict[str, float] = field(default_factory=dict)
    # Output tokens of the finished jobs per simulated second: "mean" over every GPU,
    # "by_gpu" keyed "pool/gpu".
    output_tokens_per_s_per_gpu: dict[str, Any] = field(default_factory=dict)
    # How the run ended ("stopped": finished, drain_limit or cycle_budget; "at_ms")
    # and the jobs left: "count", "by_reason" (UNFINISHED's keys), "examples" (ids).
    unfinished: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wait_samples: list[float] = field(default_factory=list, repr=False)
    e2e_samples: list[float] = field(default_factory=list, repr=False)
    ttft_samples: list[float] = field(default_factory=list, repr=False)
    tpot_samples: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """The report as JSON data; without `samples`, each distribution as its 1st..100th
        percentiles (`cdf_ms`, enough to draw its CDF) instead of every sample."""
        out = dataclasses.asdict(self)
        if not samples:
            for key in ("wait_samples", "e2e_samples", "ttft_samples", "tpot_samples"):
                out.pop(key)
            out["cdf_ms"] = {
                "wait": quantiles(self.wait_samples),
                "end_to_end": quantiles(self.e2e_samples),
                "ttft": quantiles(self.ttft_samples),
                "tpot": quantiles(self.tpot_samples),
            }
        return out

    def deterministic(self) -> dict[str, Any]:
        """Everything but wall-clock figures: equal for equal seeds."""
        out = self.to_dict()
        for key in ("decision_latency_ms", "wall_s"):
            out.pop(key)
        return out


Metric = Callable[[SimJob], float | None]  # a job's value, None where it has none


def _wait(job: SimJob) -> float | None:
    return float(job.dispatched_ms - job.arrival.at_ms) if job.done_ms >= 0 else None


def _e2e(job: SimJob) -> float | None:
    return float(job.done_ms - job.arrival.at_ms) if job.done_ms >= 0 else None


def _ttft(job: SimJob) -> float | None:
    return float(job.first_token_ms - job.arrival.at_ms) if job.first_token_ms >= 0 else None


def _tpot(job: SimJob) -> float | None:
    if job.done_ms < 0 or job.first_token_ms < 0 or job.arrival.output_tokens < 2:
        return None
    return (job.done_ms - job.first_token_ms) / (job.arrival.output_tokens - 1)


def _samples(jobs: list[SimJob], metric: Metric) -> list[float]:
    return sorted(v for v in map(metric, jobs) if v is not None)


def _breakdown(jobs: list[SimJob], metric: Metric) -> dict[str, Any]:
    """percentiles() of a metric over every job that has it, by priority, by tenant."""
    every: list[float] = []
    by_priority: dict[str, list[float]] = defaultdict(list)
    by_tenant: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        value = metric(job)
        if value is None:
            continue
        every.append(value)
        by_priority[job.arrival.priority].append(value)
        if job.arrival.tenant_id:
            by_tenant[job.arrival.tenant_id].append(value)
    return {
        "all": percentiles(every),
        "by_priority": {k: percentiles(v) for k, v in sorted(by_priority.items())},
        "by_tenant": {k: percentiles(v) for k, v in sorted(by_tenant.items())},
    }


def _prefix_cache(jobs: list[SimJob]) -> dict[str, float]:
    """The hit rate in tokens: of the admitted jobs' prompt tokens, the share cached. A
    job counts once its worker admitted it (`admitted_ms`: its prefill began, its cache
    lookup done), not while it waits inside the worker for KV room."""
    admitted = [j for j in jobs if j.admitted_ms >= 0]
    prompt = sum(j.arrival.prompt_tokens for j in admitted)
    cached = sum(j.cached_tokens for j in admitted)
    return {
        "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "cached_tokens": cached,
        "prompt_tokens": prompt,
    }


def _per_gpu(
    jobs: list[SimJob],
    cluster: SimCluster,
    placements: Mapping[str, tuple[str, int]],
    seconds: float,
) -> dict[str, Any]:
    """Output tokens of the finished jobs per second, on each GPU and their mean."""
    where = {**placements, **{w.id: (w.pool, w.gpu) for w in cluster.workers.values()}}
    tokens: Counter[tuple[str, int]] = Counter({gpu: 0 for gpu in cluster.gpus})
    for job in jobs:
        if job.done_ms >= 0 and job.worker in where:
            tokens[where[job.worker]] += job.arrival.output_tokens
    rates = {f"{pool}/{gpu}": round(n / seconds, 2) for (pool, gpu), n in sorted(tokens.items())}
    mean = sum(rates.values()) / len(rates) if rates else 0.0
    return {"mean": round(mean, 2), "by_gpu": rates}


def _unfinished(
    jobs: list[SimJob],
    arrivals: list[Arrival],
    cluster: SimCluster,
    *,
    stopped: str,
    at_ms: int,
    drain_limit_s: float,
    last_source: str,
) -> dict[str, Any]:
    """How the run ended and why each job left was not done (UNFINISHED), with examples;
    a queued job's reason is the cluster's state at the end and the last cycle's source,
    or, by a free slot when a cycle budget stopped the run, that no cycle decided it."""
    served, free = cluster.models_served()
    ids: dict[str, list[str]] = defaultdict(list)
    for job in jobs:
        if job.done_ms >= 0:
            continue
        if job.dispatched_ms >= 0:
            reason = "running"
        elif job.job.model_ref not in served:
            reason = "queued_no_worker"
        elif job.job.model_ref not in free:
            reason = "queued_no_slot"
        elif stopped == "cycle_budget":
            reason = "queued_not_decided"  # the budget, not the policy, left it there
        elif last_source in FALLBACK_SOURCES:
            reason = "queued_scheduler_failed"
        else:
            reason = "queued_policy_waited"
        ids[reason].append(job.job.id)
    ids["not_arrived"] = [a.job_id for a in arrivals if a.job_id not in cluster.jobs]
    return {
        "stopped": stopped,
        "at_ms": at_ms,
        "drain_limit_s": drain_limit_s,
        "count": sum(len(v) for v in ids.values()),
        "by_reason": {k: len(v) for k, v in sorted(ids.items()) if v},
        "examples": {k: v[:EXAMPLES] for k, v in sorted(ids.items()) if v},
    }


def build_report(
    *,
    policy: str,
    seed: int,
    workload: dict[str, Any],
    cluster: ClusterSpec,
    cluster_state: SimCluster,
    arrivals: list[Arrival],
    end_ms: int,
    latencies: list[float],
    sources: Counter[str],
    actions: Counter[str],
    rules: Counter[str],
    fallback_reasons: Counter[str],
    queue_series: list[tuple[int, int]],
    vram_series: list[tuple[int, float]],
    wall_s: float,
    stopped: str = "finished",
    drain_limit_s: float = 0.0,
    last_source: str = "",
    placements: Mapping[str, tuple[str, int]] | None = None,
) -> SimReport:
    """The report of a run that ended at `end_ms` (simulated), for the reason `stopped`
    (finished, drain_limit or cycle_budget); `last_source` is its last cycle's source,
    `placements` the (pool, gpu) of workers no longer in `cluster_state`."""
    jobs = list(cluster_state.jobs.values())
    done = [j for j in jobs if j.done_ms >= 0]
    seconds = max(end_ms, 1) / 1000
    window = max((a.at_ms for a in arrivals), default=0)
    # Fairness over the arrival window: each tenant's share of its own demand served.
    demand: Counter[str] = Counter(a.tenant_id for a in arrivals if a.tenant_id)
    served: Counter[str] = Counter(
        j.arrival.tenant_id for j in done if j.arrival.tenant_id and j.done_ms <= window
    )
    tenant_rates = {t: round(served[t] / seconds, 4) for t in sorted(demand)}
    fallbacks = sources["platform-fallback"] + sources["wait-fallback"]
    vram_values = [v for _, v in vram_series]
    return SimReport(
        policy=policy,
        seed=seed,
        workload=workload,
        cluster=dataclasses.asdict(cluster),
        jobs_submitted=len(arrivals),
        jobs_completed=len(done),
        jobs_unfinished=len(arrivals) - len(done),
        simulated_s=round(seconds, 3),
        throughput_jobs_per_s=round(len(done) / seconds, 4),
        tokens_per_s=round(sum(j.arrival.output_tokens for j in done) / seconds, 2),
        wait_ms=_breakdown(jobs, _wait),
        end_to_end_ms=_breakdown(jobs, _e2e),
        fairness_jain=jain([served[t] / demand[t] for t in sorted(demand)]),
        vram_utilization={
            "mean": round(time_mean(vram_series, end_ms), 4),
            "max": round(max(vram_values), 4) if vram_values else 0.0,
        },
        worker_starts=cluster_state.starts,
        worker_evictions=cluster_state.evictions,
        cycles=sum(sources.values()),
        decisions_by_action=dict(sorted(actions.items())),
        decisions_by_rule=dict(sorted(rules.items())),
        decisions_by_source=dict(sorted(sources.items())),
        fallbacks=fallbacks,
        timeouts=fallback_reasons["timeout"],
        fallback_reasons=dict(sorted(fallback_reasons.items())),
        decision_latency_ms=percentiles(latencies),
        wall_s=round(wall_s, 3),
        tenant_throughput=tenant_rates,
        ttft_ms=_breakdown(jobs, _ttft),
        tpot_ms=_breakdown(jobs, _tpot),
        prefix_cache=_prefix_cache(jobs),
        output_tokens_per_s_per_gpu=_per_gpu(jobs, cluster_state, placements or {}, seconds),
        unfinished=_unfinished(
            jobs,
            arrivals,
            cluster_state,
            stopped=stopped,
            at_ms=end_ms,
            drain_limit_s=drain_limit_s,
            last_source=last_source,
        ),
        series={
            "queue_depth": thin([(t, float(d)) for t, d in queue_series]),
            "vram_utilization": thin(vram_series),
        },
        wait_samples=_samples(done, _wait),
        e2e_samples=_samples(done, _e2e),
        ttft_samples=_samples(jobs, _ttft),
        tpot_samples=_samples(jobs, _tpot),
    )


# ---------------------------------------------------------------- rendering
def headline(r: SimReport) -> dict[str, float]:
    """The report's figures by row label: what tables show and comparisons test.
    TTFT and TPOT rows appear only when the run measured them."""
    out: dict[str, float] = {
        "jobs completed": r.jobs_completed,
        "jobs unfinished": r.jobs_unfinished,
        "throughput (jobs/s)": r.throughput_jobs_per_s,
        "tokens/s": r.tokens_per_s,
        "output tokens/s per GPU": r.output_tokens_per_s_per_gpu.get("mean", 0.0),
    }
    latencies = [("wait", r.wait_ms, ("p50", "p95", "p99")),
                 ("end-to-end", r.end_to_end_ms, ("p50", "p95", "p99")),
                 ("TTFT", r.ttft_ms, ("p50", "p90", "p99")),
                 ("TPOT", r.tpot_ms, ("p50", "p99"))]  # fmt: skip
    for metric, values, qs in latencies:
        if not values or not values["all"]["count"]:
            continue
        for q in qs:
            out[f"{metric} {q} (ms)"] = values["all"][q]
        if metric == "TPOT":
            continue  # per-token pace: by priority or tenant it tells little more
        for group, prefix in (("by_priority", ""), ("by_tenant", "tenant ")):
            for name, stats in values[group].items():
                out[f"{metric} p99 {prefix}{name} (ms)"] = stats["p99"]
    out["prefix-cache hit rate"] = r.prefix_cache.get("hit_rate", 0.0)
    if r.tenant_throughput:
        out["fairness (Jain, tenants)"] = r.fairness_jain
    out |= {
        "VRAM utilization mean": r.vram_utilization["mean"],
        "worker starts": r.worker_starts,
        "worker evictions": r.worker_evictions,
        "cycles": r.cycles,
        "fallbacks": r.fallbacks,
        "timeouts": r.timeouts,
        "decision latency p50 (ms)": r.decision_latency_ms["p50"],
        "decision latency p99 (ms)": r.decision_latency_ms["p99"],
    }
    return out


def _format(label: str, value: float) -> str:
    if label.startswith(("decision latency", "TPOT")):
        return f"{value:.2f}"
    if label.endswith("(ms)") or float(value).is_integer():
        return f"{value:.0f}"
    if "tokens/s" in label:
        return f"{value:.1f}"
    return f"{value:.3f}"


def unfinished_text(r: SimReport) -> str:
    """How the run ended and what it left unfinished, by reason, with example job ids."""
    u = r.unfinished
    if not u:
        return "-"
    stops = {
        "finished": "every job finished",
        "drain_limit": f"stopped at the drain limit, {u['drain_limit_s']:g} s after the last "
        f"arrival (t={u['at_ms'] / 1000:.1f}s)",
        "cycle_budget": f"stopped at the cycle budget (t={u['at_ms'] / 1000:.1f}s)",
    }
    text: str = stops.get(u["stopped"], u["stopped"])
    if not u["count"]:
        return text
    reasons = "; ".join(
        f"{UNFINISHED.get(k, k)} {n} (e.g. {', '.join(u['examples'][k])})"
        for k, n in u["by_reason"].items()
    )
    return f"{u['count']} unfinished, {text}: {reasons}"


def table(reports: list[SimReport], marks: dict[str, str] | None = None) -> str:
    """Headline figures, one column per report (and the change, for two); `marks`
    flags rows, such as the differences beyond run-to-run noise in a comparison.
    Under it: decisions by kind, tokens/s by GPU, and what was left unfinished."""
    marks = marks or {}
    figures = [headline(r) for r in reports]
    labels = list(dict.fromkeys(label for f in figures for label in f))
    rows: list[tuple[str, list[str]]] = [
        ("policy", [r.policy for r in reports]),
        ("jobs submitted", [str(r.jobs_submitted) for r in reports]),
        ("simulated time (s)", [f"{r.simulated_s:.1f}" for r in reports]),
    ]
    for label in labels:
        values = [f.get(label) for f in figures]
        cells = ["-" if v is None else _format(label, v) for v in values]
        if len(reports) == 2:
            a, b = values
            change = (
                ""
                if a is None or b is None or a == b
                else (f"{(b - a) / abs(a) * 100:+.0f}%" if a else "new")
            )
            cells.append(change)
        rows.append((label, cells))
    width = max(len(label) for label, _ in rows) + 2
    columns = max(len(cells) for _, cells in rows)
    cols = [max(len(c[i]) for _, c in rows if i < len(c)) + 2 for i in range(columns)]
    lines = []
    for label, cells in rows:
        mark = marks.get(label, " ")
        text = "".join(v.rjust(w) for v, w in zip(cells, cols, strict=False))
        lines.append(f"{mark} {label.ljust(width)}{text}".rstrip())
    # Counts by kind vary in length: listed under the table, not as columns.
    for label, key in (
        ("decisions by action", "decisions_by_action"),
        ("decisions by source", "decisions_by_source"),
        ("decisions by rule", "decisions_by_rule"),
    ):
        lines.append(f"  {label}:")
        lines += [f"    {r.policy}: {_pairs(getattr(r, key))}" for r in reports]
    lines.append("  output tokens/s by GPU:")
    for r in reports:
        by_gpu = list(r.output_tokens_per_s_per_gpu.get("by_gpu", {}).items())
        shown = ", ".join(f"{gpu} {rate:.1f}" for gpu, rate in by_gpu[:GPUS_LISTED])
        more = f", ... ({len(by_gpu)} GPUs)" if len(by_gpu) > GPUS_LISTED else ""
        lines.append(f"    {r.policy}: {shown or '-'}{more}")
    lines.append("  unfinished:")
    lines += [f"    {r.policy}: {unfinished_text(r)}" for r in reports]
    return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def plots(reports: list[SimReport], directory: Path) -> list[Path]:
    """The five PNG plots, each showing every report (A against B in a comparison)."""
    import matplotlib  # noqa: PLC0415 - heavy, and only reports need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in reports:
        xs = [t / 1000 for t, _ in r.series["queue_depth"]]
        ax.step(xs, [v for _, v in r.series["queue_depth"]], where="post", label=r.policy)
    ax.set(title="Queue depth over time", xlabel="simulated time (s)", ylabel="queued jobs")
    out.append(_save(fig, ax, directory / "queue_depth.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, r in enumerate(reports):
        for samples, style, what in (
            (r.wait_samples, "--", "wait"),
            (r.e2e_samples, "-", "end-to-end"),
        ):
            if samples:
                ax.plot([s / 1000 for s in samples], _shares(samples, r), style,
                        color=f"C{index}", label=f"{r.policy} {what}")  # fmt: skip
    ax.set(title="Latency CDF", xlabel="seconds", ylabel="share of submitted jobs",
           xscale="symlog")  # fmt: skip
    out.append(_save(fig, ax, directory / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in reports:
        xs = [t / 1000 for t, _ in r.series["vram_utilization"]]
        ax.step(
            xs, [v * 100 for _, v in r.series["vram_utilization"]], where="post", label=r.policy
        )
    ax.set(
        title="GPU VRAM allocated",
        xlabel="simulated time (s)",
        ylabel="% of all VRAM",
        ylim=(0, 100),
    )
    out.append(_save(fig, ax, directory / "vram_utilization.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    tenants = sorted({t for r in reports for t in r.tenant_throughput}) or ["(no tenants)"]
    width = 0.8 / max(1, len(reports))
    for i, r in enumerate(reports):
        xs = [x + i * width for x in range(len(tenants))]
        ax.bar(xs, [r.tenant_throughput.get(t, 0.0) for t in tenants], width, label=r.policy)
    ax.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(len(tenants))], tenants)
    ax.set(title="Throughput per tenant (arrival window)", ylabel="jobs/s")
    out.append(_save(fig, ax, directory / "tenant_throughput.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, r in enumerate(reports):
        if r.ttft_samples:
            ax.plot([s / 1000 for s in r.ttft_samples], _shares(r.ttft_samples, r),
                    color=f"C{index}", label=r.policy)  # fmt: skip
    if not any(r.ttft_samples for r in reports):
        ax.text(0.5, 0.5, "no first tokens timed", ha="center", transform=ax.transAxes)
    ax.set(title="Time to first token CDF", xlabel="seconds", ylabel="share of submitted jobs",
           xscale="symlog")  # fmt: skip
    out.append(_save(fig, ax, directory / "ttft_cdf.png"))
    return out


def _shares(samples: list[float], r: SimReport) -> list[float]:
    """A CDF's heights as shares of the jobs submitted, not of those measured: a run that
    left jobs unfinished tops out below 1, so that A and B compare on one base."""
    return [(i + 1) / max(r.jobs_submitted, len(samples)) for i in range(len(samples))]


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return path


def write_html(
    reports: list[SimReport],
    directory: Path,
    title: str,
    marks: dict[str, str] | None = None,
    note: str = "",
) -> Path:
    """report.html with the table, what was left unfinished, the plots and the JSON, in
    `directory`; `note` (plain text) says what a comparison's noise is."""
    images = plots(reports, directory)
    unfinished = "".join(
        f"<li>{html.escape(r.policy)}: {html.escape(unfinished_text(r))}</li>" for r in reports
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Simulated with orchestratord: the real sandbox, validator and fallback, on a "
        "simulated clock. Rows marked * differ beyond run-to-run noise.</p>"
        if marks
        else "",
        f"<p>{html.escape(note)}</p>" if note else "",
        f"<pre>{html.escape(table(reports, marks))}</pre>",
        f"<h2>Unfinished jobs</h2><ul>{unfinished}</ul>",
        *(
            f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img src="{p.name}" alt="{p.stem}">'
            for p in images
        ),
        "<h2>JSON</h2>",
        f"<pre>{html.escape(json.dumps([r.to_dict() for r in reports], indent=2)[:200_000])}</pre>",
    ]
    page = directory / "report.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f6f6f6;"
        "padding:1em;overflow:auto}img{max-width:100%}</style>" + "\n".join(body)
    )
    (directory / "report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return page
