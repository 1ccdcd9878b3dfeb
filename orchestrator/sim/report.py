"""The simulation report: computed from a finished run, shown as a table, JSON, or an
HTML page with PNG plots."""

from __future__ import annotations

import dataclasses
import html
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sim.cluster import ClusterSpec, SimCluster, SimJob
from orchestrator.sim.workload import Arrival

SERIES_POINTS = 400  # time series are thinned to this many points in reports


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "count": len(ordered),
        "p50": at(0.5),
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
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wait_samples: list[float] = field(default_factory=list, repr=False)
    e2e_samples: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not samples:
            out.pop("wait_samples")
            out.pop("e2e_samples")
            # Enough of the distributions to draw their CDFs: the 1st..100th percentiles.
            out["cdf_ms"] = {
                "wait": quantiles(self.wait_samples),
                "end_to_end": quantiles(self.e2e_samples),
            }
        return out

    def deterministic(self) -> dict[str, Any]:
        """Everything but wall-clock figures: equal for equal seeds."""
        out = self.to_dict()
        for key in ("decision_latency_ms", "wall_s"):
            out.pop(key)
        return out


def _breakdown(jobs: list[SimJob], value: str) -> dict[str, Any]:
    def metric(job: SimJob) -> float:
        end = job.dispatched_ms if value == "wait" else job.done_ms
        return float(end - job.arrival.at_ms)

    done = [j for j in jobs if j.done_ms >= 0]
    by_priority: dict[str, list[float]] = defaultdict(list)
    by_tenant: dict[str, list[float]] = defaultdict(list)
    for job in done:
        by_priority[job.arrival.priority].append(metric(job))
        if job.arrival.tenant_id:
            by_tenant[job.arrival.tenant_id].append(metric(job))
    return {
        "all": percentiles([metric(j) for j in done]),
        "by_priority": {k: percentiles(v) for k, v in sorted(by_priority.items())},
        "by_tenant": {k: percentiles(v) for k, v in sorted(by_tenant.items())},
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
) -> SimReport:
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
        wait_ms=_breakdown(jobs, "wait"),
        end_to_end_ms=_breakdown(jobs, "e2e"),
        fairness_jain=jain([served[t] / demand[t] for t in sorted(demand)]),
        vram_utilization={
            "mean": round(sum(vram_values) / len(vram_values), 4) if vram_values else 0.0,
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
        series={
            "queue_depth": [
                (t, float(d)) for t, d in thin([(t, float(d)) for t, d in queue_series])
            ],
            "vram_utilization": thin(vram_series),
        },
        wait_samples=sorted(float(j.dispatched_ms - j.arrival.at_ms) for j in done),
        e2e_samples=sorted(float(j.done_ms - j.arrival.at_ms) for j in done),
    )


# ---------------------------------------------------------------- rendering
def headline(r: SimReport) -> dict[str, float]:
    """The report's figures by row label: what tables show and comparisons test."""
    out: dict[str, float] = {
        "jobs completed": r.jobs_completed,
        "throughput (jobs/s)": r.throughput_jobs_per_s,
        "tokens/s": r.tokens_per_s,
    }
    for metric, values in (("wait", r.wait_ms), ("end-to-end", r.end_to_end_ms)):
        for q in ("p50", "p95", "p99"):
            out[f"{metric} {q} (ms)"] = values["all"][q]
        for group, prefix in (("by_priority", ""), ("by_tenant", "tenant ")):
            for name, stats in values[group].items():
                out[f"{metric} p99 {prefix}{name} (ms)"] = stats["p99"]
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
    if label.startswith("decision latency"):
        return f"{value:.2f}"
    if label.endswith("(ms)") or float(value).is_integer():
        return f"{value:.0f}"
    if label == "tokens/s":
        return f"{value:.1f}"
    return f"{value:.3f}"


def table(reports: list[SimReport], marks: dict[str, str] | None = None) -> str:
    """Headline figures, one column per report (and the change, for two); `marks`
    flags rows, such as the differences beyond run-to-run noise in a comparison."""
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
    return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def plots(reports: list[SimReport], directory: Path) -> list[Path]:
    """The four PNG plots, each showing every report."""
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
                ys = [(i + 1) / len(samples) for i in range(len(samples))]
                ax.plot([s / 1000 for s in samples], ys, style, color=f"C{index}",
                        label=f"{r.policy} {what}")  # fmt: skip
    ax.set(title="Latency CDF", xlabel="seconds", ylabel="share of jobs", xscale="symlog")
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
    return out


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return path


def write_html(
    reports: list[SimReport], directory: Path, title: str, marks: dict[str, str] | None = None
) -> Path:
    """report.html with the table, the four plots and the JSON, in `directory`."""
    images = plots(reports, directory)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Simulated with orchestratord: the real sandbox, validator and fallback, on a "
        "simulated clock. Rows marked * differ beyond run-to-run noise.</p>"
        if marks
        else "",
        f"<pre>{html.escape(table(reports, marks))}</pre>",
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
