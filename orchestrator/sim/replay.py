"""Replay: a candidate scheduler decides every cycle of a decision log, and we report
where and how its decisions differ from what was executed."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain import decision as decisions
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.sim.report import percentiles
from orchestrator.sim.run import Progress
from orchestrator.state.decision_log import log_files, read_log

SHOWN = 50  # differences listed in full


@dataclass
class ReplayReport:
    candidate: str
    files: list[str]
    cycles: int = 0
    differing: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    logged_sources: dict[str, int] = field(default_factory=dict)
    candidate_sources: dict[str, int] = field(default_factory=dict)
    candidate_failures: dict[str, int] = field(default_factory=dict)
    candidate_latency_ms: dict[str, float] = field(default_factory=dict)
    logged_latency_ms: dict[str, float] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def diff_rate(self) -> float:
        return round(self.differing / self.cycles, 4) if self.cycles else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "diff_rate": self.diff_rate}

    def text(self) -> str:
        lines = [
            f"replayed {self.cycles} cycles of {len(self.files)} log file(s) with "
            f"{self.candidate} in {self.wall_s:.1f}s",
            f"decisions differ on {self.differing} cycles ({self.diff_rate:.1%})"
            + (
                ": " + ", ".join(f"{k} {v}" for k, v in self.by_kind.items())
                if self.by_kind
                else ""
            ),
            "logged sources: " + _pairs(self.logged_sources),
            "candidate sources: "
            + _pairs(self.candidate_sources)
            + (
                f" (failures: {_pairs(self.candidate_failures)})" if self.candidate_failures else ""
            ),
            f"candidate decision latency p50 {self.candidate_latency_ms.get('p50', 0):.2f} ms, "
            f"p99 {self.candidate_latency_ms.get('p99', 0):.2f} ms (logged: "
            f"p50 {self.logged_latency_ms.get('p50', 0):.2f}, "
            f"p99 {self.logged_latency_ms.get('p99', 0):.2f})",
        ]
        if self.differences:
            lines.append("")
            lines.append(f"first {len(self.differences)} differences:")
            for d in self.differences:
                when = time.strftime("%H:%M:%S", time.gmtime(d["wall_ms"] / 1000))
                lines.append(f"  seq {d['seq']} at {when} (queue {d['queue_depth']}) [{d['kind']}]")
                lines.append(f"    logged ({d['logged_source']}):    {d['logged']}")
                lines.append(f"    candidate ({d['candidate_source']}): {d['candidate']}")
        return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


async def replay(
    log: Path,
    lua: str,
    name: str,
    *,
    language: str = "luajit",
    deadline_ms: int = 50,
    limit: int = 0,
    progress: Progress | None = None,
) -> ReplayReport:
    """Run the candidate on every logged cycle of `log` (a file or a directory)."""
    files = log_files(log)
    report = ReplayReport(candidate=name, files=[str(f) for f in files])
    kinds: Counter[str] = Counter()
    logged_sources: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    logged_latencies: list[float] = []
    started = last = time.perf_counter()
    options = EngineOptions.from_config(
        SchedulerConfig(deadline_ms=deadline_ms), spares=1, platform_spares=0
    )
    async with SchedulingEngine(
        user_source=lua, user_name=name, language=language, options=options
    ) as engine:
        for index, path in enumerate(files):
            for cycle in read_log(path):
                if limit and report.cycles >= limit:
                    break
                result = await engine.schedule(cycle.context)
                report.cycles += 1
                logged_sources[cycle.source] += 1
                sources[result.source] += 1
                if result.error is not None:
                    failures[result.error.kind] += 1
                latencies.append(result.latency_ms)
                logged_latencies.append(cycle.latency_ms)
                kind = decisions.difference(cycle.decision, result.decision)
                if kind is not None:
                    report.differing += 1
                    kinds[kind] += 1
                    if len(report.differences) < SHOWN:
                        report.differences.append(
                            {
                                "seq": cycle.seq,
                                "wall_ms": cycle.wall_ms,
                                "kind": kind,
                                "queue_depth": len(cycle.context.queue),
                                "logged": decisions.describe(cycle.decision),
                                "logged_source": cycle.source,
                                "candidate": decisions.describe(result.decision),
                                "candidate_source": result.source,
                            }
                        )
                if progress is not None and time.perf_counter() - last > 0.25:
                    last = time.perf_counter()
                    progress(
                        index / len(files), f"{report.cycles} cycles, {report.differing} differ"
                    )
    report.by_kind = dict(sorted(kinds.items()))
    report.logged_sources = dict(sorted(logged_sources.items()))
    report.candidate_sources = dict(sorted(sources.items()))
    report.candidate_failures = dict(sorted(failures.items()))
    report.candidate_latency_ms = percentiles(latencies)
    report.logged_latency_ms = percentiles(logged_latencies)
    report.wall_s = round(time.perf_counter() - started, 3)
    if progress is not None:
        progress(1.0, f"{report.cycles} cycles, {report.differing} differ")
    return report
