"""A/B comparison: two policies on identical workloads, and which differences are
larger than run-to-run noise.

A simulation is deterministic for a seed, so the noise that matters is the workload's:
another seed draws other arrivals, models and token counts. Both policies run on the
same arrivals for each of several seeds; a figure's difference is marked when the
mean difference exceeds twice its standard error across those replicates and 1% of
A's value (with one replicate, never).

On a trace the arrivals, their sizes and models are the trace's whatever the seed: a
seed draws only which requests are interactive and which tenant sends each (and nothing
when --interactive is 0 or 1 and there are no tenants). The noise is then that of those
draws, smaller than a generated workload's: a marked difference holds for this trace
under other priority and tenant assignments, not for other traffic. A seed that gives
arrivals equal to an earlier seed's adds no information and is not run; with a single
distinct workload nothing is marked (`Comparison.noise` says which case it was).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain.context import Catalog
from orchestrator.sim.report import SimReport, headline
from orchestrator.sim.run import Progress, default_catalog, part_progress, simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import Arrival

NOISE_FACTOR = 2.0  # standard errors a difference must exceed to be marked
MIN_EFFECT = 0.01  # and 1% of A's value: consistent but negligible differences stay unmarked


@dataclass(frozen=True)
class Policy:
    lua: str | None  # None: the platform scheduler
    name: str


@dataclass
class Comparison:
    reports: list[SimReport]  # A and B on the first seed: what tables and plots show
    replicates: list[tuple[SimReport, SimReport]]
    significant: dict[str, str]  # row label -> "*"
    noise: str = ""  # what the replicates vary, in words (the module docstring)

    def to_dict(self) -> dict[str, object]:
        return {
            "reports": [r.to_dict() for r in self.reports],
            "replicate_seeds": [a.seed for a, _ in self.replicates],
            "noise": self.noise,
            "significant": sorted(self.significant),
            "differences": paired_differences(self.replicates),
        }


def paired_differences(pairs: list[tuple[SimReport, SimReport]]) -> dict[str, dict[str, float]]:
    """Per figure: mean of (B - A) over the replicates, its standard error, and the
    scale it is judged against (the mean magnitude of A's value)."""
    out: dict[str, dict[str, float]] = {}
    figures = [(headline(a), headline(b)) for a, b in pairs]
    for label in figures[0][0] if figures else {}:
        deltas = [b[label] - a[label] for a, b in figures if label in a and label in b]
        if not deltas:
            continue
        mean = sum(deltas) / len(deltas)
        se = 0.0
        if len(deltas) > 1:
            variance = sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1)
            se = math.sqrt(variance / len(deltas))
        scale = sum(abs(a[label]) for a, _ in figures if label in a) / len(figures)
        out[label] = {"mean": round(mean, 4), "stderr": round(se, 4), "n": len(deltas),
                      "scale": round(scale, 4)}  # fmt: skip
    return out


def significant(pairs: list[tuple[SimReport, SimReport]]) -> dict[str, str]:
    if len(pairs) < 2:
        return {}
    return {
        label: "*"
        for label, d in paired_differences(pairs).items()
        if abs(d["mean"]) > NOISE_FACTOR * d["stderr"] and abs(d["mean"]) >= MIN_EFFECT * d["scale"]
    }


async def compare(
    a: Policy,
    b: Policy,
    settings: SimSettings,
    *,
    replicates: int = 3,
    catalog: Catalog | None = None,
    scheduler: SchedulerConfig = SchedulerConfig(),
    progress: Progress | None = None,
) -> Comparison:
    """A and B on the workloads of seeds settings.seed, +1, ... (`replicates` of them,
    less those equal to an earlier seed's), and the differences beyond their noise."""
    catalog = catalog or default_catalog()
    seeds = [settings.seed + i for i in range(max(1, replicates))]
    workloads: list[tuple[SimSettings, list[Arrival]]] = []
    for seed in seeds:
        run_settings = settings.with_seed(seed)
        # Pure and CPU-bound (a trace is parsed again): off the event loop.
        arrivals = await asyncio.to_thread(run_settings.arrivals, catalog)
        if all(arrivals != earlier for _, earlier in workloads):
            workloads.append((run_settings, arrivals))
    pairs: list[tuple[SimReport, SimReport]] = []
    runs = 2 * len(workloads)
    for i, (run_settings, arrivals) in enumerate(workloads):
        pair = []
        for j, policy in enumerate((a, b)):
            step = 2 * i + j
            report = await simulate(
                policy.lua,
                policy.name,
                run_settings,
                catalog=catalog,
                arrivals=arrivals,
                scheduler=scheduler,
                progress=part_progress(
                    progress, step, runs, f"run {step + 1}/{runs} {policy.name}"
                ),
            )
            pair.append(report)
        pairs.append((pair[0], pair[1]))
    return Comparison(list(pairs[0]), pairs, significant(pairs), _noise(settings, workloads))


def _noise(settings: SimSettings, workloads: list[tuple[SimSettings, list[Arrival]]]) -> str:
    seeds = ", ".join(str(s.seed) for s, _ in workloads)
    if len(workloads) < 2:
        return f"one distinct workload (seed {seeds}): no noise estimate, nothing marked" + (
            " (on a trace, seeds draw only priorities and tenants)" if settings.trace else ""
        )
    if settings.trace:
        return (
            f"seeds {seeds} on one trace: the arrivals are the trace's, the seeds draw only "
            "which requests are interactive and their tenants"
        )
    return f"seeds {seeds}: each draws its own arrivals, models and token counts"
