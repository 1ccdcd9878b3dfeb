"""A/B comparison: two policies on identical workloads, and which differences are
larger than run-to-run noise.

A simulation is deterministic for a seed, so the noise that matters is the workload's:
another seed draws other arrivals, models and token counts. Both policies run on the
same arrivals for each of several seeds; a figure's difference is marked when the
mean difference exceeds twice its standard error across those replicates and 1% of
A's value (with one replicate, never).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain.context import Catalog
from orchestrator.sim.report import SimReport, headline
from orchestrator.sim.run import Progress, default_catalog, part_progress, simulate
from orchestrator.sim.settings import SimSettings

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

    def to_dict(self) -> dict[str, object]:
        return {
            "reports": [r.to_dict() for r in self.reports],
            "replicate_seeds": [a.seed for a, _ in self.replicates],
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
    catalog = catalog or default_catalog()
    pairs: list[tuple[SimReport, SimReport]] = []
    runs = 2 * max(1, replicates)
    for i in range(max(1, replicates)):
        run_settings = settings.with_seed(settings.seed + i)
        arrivals = run_settings.arrivals(catalog)
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
    return Comparison(list(pairs[0]), pairs, significant(pairs))
