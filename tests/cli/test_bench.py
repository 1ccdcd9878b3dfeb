"""Regression guard for the benchmark: it runs, it reports, and what it measures holds.

Timings are `make bench`'s business (non-negotiable 4); this suite asserts only what
does not depend on the machine's speed: the bytes a delta cycle sends, and that the
quick benchmark produces a complete report.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from orchestrator.cli import bench
from orchestrator.domain.samples import churn, synthetic_cluster
from orchestrator.state.journal import SnapshotJournal
from orchestrator.support.log import configure_logging


@pytest.fixture
def bench_logging() -> Iterator[None]:
    """Log as `orchestratord bench` does: pytest's default structlog setup renders an
    event per decision to the console, which is the test harness's cost, not ours."""
    configure_logging("console", "error")
    yield
    structlog.reset_defaults()


def test_a_one_percent_churn_delta_is_far_smaller_than_a_full_snapshot() -> None:
    """At 10,000 jobs and 1,024 workers, a worker one cycle behind gets a request at
    least 20x smaller than the full snapshot a new worker gets."""
    journal = SnapshotJournal()
    ctx = synthetic_cluster(10_000, 1024)
    journal.advance(ctx)
    held = journal.seq
    journal.advance(churn(ctx, 0))
    delta = journal.request_for(journal.epoch, held)
    full = journal.request_for(0, 0)
    assert len(delta.deltas) == 1 and not delta.HasField("snapshot")
    assert full.HasField("snapshot") and not full.deltas
    assert full.ByteSize() >= 20 * delta.ByteSize(), (full.ByteSize(), delta.ByteSize())


@pytest.mark.usefixtures("bench_logging")
async def test_quick_benchmark_reports_every_figure() -> None:
    """`bench --quick` measures the echo, decision, delta and full figures, each with a
    positive median no larger than its p99, and renders them as the BENCHMARKS table."""
    report = await bench.run(quick=True)
    names = [f.name for f in report.figures]
    assert any("bare gRPC echo" in name for name in names), names
    for expected in ("decision round trip", "(delta)", "full resync"):
        assert any(expected in name for name in names), (expected, names)
    for figure in report.figures:
        assert 0 < figure.median <= figure.p99, figure
    text = bench.render(report)
    assert text.startswith("# Benchmarks") and "| figure | median | p99 |" in text


def test_the_full_benchmark_finds_the_azure_trace_in_a_checkout() -> None:
    """Without the trace the full run drops its replay figure without a word; it did so
    once when bench.py moved a folder down and its path to tests/ went stale."""
    assert bench.TRACE.is_file()
