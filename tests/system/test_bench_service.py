"""The whole-service throughput benchmark (orchestrator/cli/bench_service.py) runs,
loses no job, and reports every figure. How fast is `make bench`'s business: nothing
here depends on the machine's speed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from orchestrator.cli.bench_service import MAIN_THREAD, service_throughput
from orchestrator.support.log import configure_logging

pytestmark = pytest.mark.slow


@pytest.fixture
def bench_logging() -> Iterator[None]:
    """Log as the benchmark does (errors only): not an event per decision."""
    configure_logging("console", "error")
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("bench_logging")
@pytest.mark.parametrize("api", ["grpc", "openai"])
async def test_the_service_throughput_benchmark_loses_no_job_and_reports_its_figures(
    api: str,
) -> None:
    result = await service_throughput(api, concurrency=8, rounds=2, round_s=1, warmup_s=1)
    assert (result.failed, result.unfinished) == (0, 0)
    assert result.completed > 0 and len(result.rates) == 2
    assert result.requests >= result.completed
    assert result.cycle_count > 0 and result.dispatches_per_cycle > 0
    assert {"orchestrator", "load generator", "development workers"} <= set(result.cpu_cores)
    assert MAIN_THREAD in result.threads
    assert sum(share for _, share in result.stages) == pytest.approx(1.0)
    figures = result.figures()
    assert figures[0]["name"].startswith("requests per second, whole service")
    for figure in figures:
        assert {"name", "median", "p99", "note"} <= set(figure), figure
        assert figure["median"] >= 0 and figure["p99"] >= 0, figure
