"""Replay: a candidate scheduler decides every cycle of a decision log, and we report
where and how its decisions differ from what was executed.

`replay_cycle` (issue 18) takes one logged cycle instead, by its `seq`: the candidate
runs on it under trace or profile (`orchestrator/debugging/diagnose.py`), and
`explain` says whether it decides as the service did and, when not, why: the script
changed since (the log records the sha256 of the Lua the service ran), the service's
decision was the platform's (no user scheduler, or the user's failed then), the
candidate fails or is rejected, or it decides otherwise.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.settings import SchedulerConfig
from orchestrator.debugging.diagnose import Diagnosis, Mode, diagnose
from orchestrator.domain import decision as decisions
from orchestrator.domain.errors import ConfigError, NotFoundError
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.sim.report import percentiles
from orchestrator.sim.run import Progress
from orchestrator.state.decision_log import LoggedCycle, log_files, read_log

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


# ---------------------------------------------------------------- one cycle, explained

SAME = "same decision as the service made"
# What the logged source means, for the explanation.
FALLBACK_SOURCES = {
    "platform-fallback": "the platform scheduler's fallback",
    "wait-fallback": "a wait (both the user's and the platform scheduler failed)",
}


@dataclass(frozen=True)
class Explanation:
    """How a candidate's decision on a logged cycle compares with the service's."""

    seq: int
    same: bool
    reasons: tuple[str, ...]  # why it differs, or notes when it is the same
    logged: str  # the service's decision, described
    logged_source: str
    scheduler: str  # the scheduler the service had in charge
    candidate: str  # the candidate's decision, described ("" when it made none)
    difference: str | None  # decisions.difference's kind, when both decided

    @property
    def summary(self) -> str:
        return SAME if self.same else "the candidate does not decide as the service did"

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "same": self.same,
            "summary": self.summary,
            "reasons": list(self.reasons),
            "logged": self.logged,
            "logged_source": self.logged_source,
            "scheduler": self.scheduler,
            "candidate": self.candidate,
            "difference": self.difference,
        }

    def text(self) -> str:
        lines = [
            f"cycle seq {self.seq}: {self.summary}",
            f"  service ({self.logged_source}, {self.scheduler}): {self.logged}",
            f"  candidate: {self.candidate or 'no decision'}",
        ]
        if self.reasons:
            lines.append("why:" if not self.same else "notes:")
            lines.extend(f"  - {reason}" for reason in self.reasons)
        return "\n".join(lines)


def explain(logged: LoggedCycle, candidate_sha256: str, diagnosis: Diagnosis) -> Explanation:
    """Compare the candidate's run on `logged` (its `diagnosis`) with what the service
    decided, and say why they differ. Pure."""
    reasons: list[str] = []
    if logged.source == "platform":
        reasons.append("the platform scheduler was in charge then: no user script ran")
    elif not logged.scheduler_sha256:
        reasons.append(
            "the log does not say which script ran (written before scheduler_sha256 was "
            "recorded): a changed script cannot be told"
        )
    elif logged.scheduler_sha256 != candidate_sha256:
        reasons.append(
            f"the script changed: the service ran {logged.scheduler} "
            f"(sha256 {logged.scheduler_sha256[:12]}), the candidate compiles to "
            f"{candidate_sha256[:12]}"
        )
    if logged.source in FALLBACK_SOURCES:
        failure = f"{logged.error_kind}: {logged.error_message}".rstrip(": ")
        reasons.append(
            f"the service's decision was {FALLBACK_SOURCES[logged.source]}: the user's "
            f"script failed then ({failure})"
        )
    if diagnosis.error is not None:
        reasons.append(
            f"the candidate failed: {diagnosis.error.kind}: {diagnosis.error.message} "
            "(the service would fall back)"
        )
    elif not diagnosis.valid:
        reasons.append(
            f"the candidate's decision would be rejected: {diagnosis.invalid_reason} "
            "(the service would fall back)"
        )
    difference = (
        decisions.difference(logged.decision, diagnosis.decision)
        if diagnosis.decision is not None
        else None
    )
    same = diagnosis.ok and difference is None
    if not same and not reasons:
        # Same script, decided by it then, valid now, and still different.
        reasons.append(
            "the same script decided otherwise on the logged context: it depends on "
            "something the log does not hold (the clock, randomness, pool state refreshed "
            "during the cycle)"
        )
    if difference is not None:
        reasons.append(f"the decisions differ in: {difference}")
    return Explanation(
        seq=logged.seq,
        same=same,
        reasons=tuple(reasons),
        logged=decisions.describe(logged.decision),
        logged_source=logged.source,
        scheduler=logged.scheduler,
        candidate="" if diagnosis.decision is None else decisions.describe(diagnosis.decision),
        difference=difference,
    )


def find_cycle(log: Path, seq: int) -> LoggedCycle:
    """The cycle `seq` of `log` (a file or a directory of them). NotFoundError when no
    file holds it; ConfigError when several do (logs of several runs of the service)."""
    found: list[tuple[Path, LoggedCycle]] = []
    seqs: list[int] = []
    for path in log_files(log):
        for cycle in read_log(path):
            seqs.append(cycle.seq)
            if cycle.seq == seq:
                found.append((path, cycle))
    if not found:
        held = f"it holds seqs {min(seqs)} to {max(seqs)}" if seqs else "it holds no cycle"
        raise NotFoundError(f"{log}: no cycle with seq {seq}; {held}")
    if len(found) > 1:
        files = ", ".join(str(path) for path, _ in found)
        raise ConfigError(
            f"{log}: seq {seq} is in several log files (the service restarted): {files}; "
            "pass the one file to replay"
        )
    return found[0][1]


async def replay_cycle(
    log: Path,
    seq: int,
    lua: str,
    name: str,
    *,
    instrument: Mode = "trace",
    language: str = "luajit",
    deadline_ms: int = 50,
) -> tuple[Explanation, Diagnosis]:
    """Run the candidate `lua` on cycle `seq` of `log` under trace or profile, and
    explain how its decision compares with the service's."""
    cycle = find_cycle(log, seq)
    diagnosis = await diagnose(
        lua, name, cycle.context, instrument=instrument, language=language, deadline_ms=deadline_ms
    )
    sha256 = hashlib.sha256(lua.encode()).hexdigest()
    return explain(cycle, sha256, diagnosis), diagnosis
