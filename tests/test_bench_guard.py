"""Regression guard: the quick benchmark, held to generous ratios only (noise cannot fail it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from orchestrator import bench
from orchestrator.log import configure_logging


@pytest.fixture
def bench_logging() -> Iterator[None]:
    """Log as `orchestratord bench` does: pytest's default structlog setup renders an
    event per decision to the console, which is the test harness's cost, not ours."""
    configure_logging("console", "error")
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("bench_logging")
async def test_deltas_stay_far_cheaper_than_full_snapshots() -> None:
    """At 10,000 jobs a delta cycle costs at least 10x less than a full resync, and a
    platform decision at most 4x a bare gRPC echo on the same socket (1.8x in `make
    bench`; inside the test suite it has been seen at up to 3.2x)."""
    report = await bench.run(quick=True)
    figures = {f.name: f for f in report.figures}
    delta = figures["cycle, 10,000 jobs / 1,024 workers, 1% churn (delta)"]
    full = figures["full resync, 10,000 jobs / 1,024 workers"]
    assert full.median >= 10 * delta.median, (full.median, delta.median)
    decision = figures["decision round trip, platform scheduler, 10 jobs / 8 workers"]
    echo = next(f for name, f in figures.items() if "bare gRPC echo" in name)
    assert decision.median <= 4 * echo.median, (decision.median, echo.median)
    text = bench.render(report)
    assert text.startswith("# Benchmarks") and "| figure | median | p99 |" in text
