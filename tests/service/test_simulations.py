"""Simulations inside the service: capped before anything is generated, one at a time,
a bounded number of cycles, and an event loop left free for scheduling and /healthz."""

from __future__ import annotations

import asyncio
import time
from typing import Any, NoReturn

import pytest

from orchestrator.config.settings import load_config
from orchestrator.domain.errors import ErrorCode, InvalidRequestError, RateLimitedError
from orchestrator.service import trials
from orchestrator.service.schedulers import ActiveScheduler
from orchestrator.service.trials import MAX_SIMULATED_JOBS, Simulations
from orchestrator.sim import settings as sim_settings
from orchestrator.sim.report import SimReport
from orchestrator.sim.run import default_catalog
from orchestrator.sim.settings import SimSettings
from tests.sim.test_limits import max_loop_lag_s


def simulations() -> Simulations:
    def active() -> ActiveScheduler:
        raise AssertionError("compare_active was not asked for")

    return Simulations(load_config(None), default_catalog, active)


@pytest.mark.parametrize(
    "workload",
    [
        # Bursts only: 30,000 jobs at t=1 s.
        {"rate": 0.0, "duration_s": 1.5, "burst_every_s": 1.0, "burst_size": 30_000},
        # The burst due just after the duration lands too (the first arrival comes
        # long after it): 300,000 jobs that were counted as 10.
        {"rate": 0.01, "duration_s": 1.0, "burst_every_s": 1.5, "burst_size": 300_000},
    ],
)
async def test_a_workload_over_the_cap_is_refused_before_it_is_generated(
    workload: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def generate(*args: object) -> NoReturn:
        raise AssertionError("generated a workload over the cap")

    monkeypatch.setattr(sim_settings, "generate", generate)
    settings = SimSettings.from_mapping(workload)
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_SIMULATED_JOBS}") as refused:
        await simulations().simulate("", "", "", settings)
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert time.perf_counter() - started < 0.5


async def test_a_second_simulation_is_refused_while_one_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not queued behind the first (each waiting request held a handler and, once let
    in, as much CPU again): refused with RATE_LIMITED (gRPC RESOURCE_EXHAUSTED, 429)."""
    inside, release = asyncio.Event(), asyncio.Event()

    async def simulate(*args: object, **kwargs: object) -> SimReport:
        inside.set()
        await release.wait()
        raise asyncio.CancelledError  # never reached with a report: the test ends it

    monkeypatch.setattr(trials, "simulate", simulate)
    service = simulations()
    small = SimSettings(rate=1.0, duration_s=2.0)
    first = asyncio.ensure_future(service.simulate("", "", "", small))
    await asyncio.wait_for(inside.wait(), 5)
    with pytest.raises(RateLimitedError, match="already running") as refused:
        await asyncio.wait_for(service.simulate("", "", "", small), 1)
    assert refused.value.code is ErrorCode.RATE_LIMITED
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    inside.clear()
    again = asyncio.ensure_future(service.simulate("", "", "", small))  # free again
    await asyncio.wait_for(inside.wait(), 5)
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)


async def test_a_simulation_stops_at_its_cycle_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy decides how many cycles a run takes; the service bounds them and
    reports what the run reached."""
    monkeypatch.setattr(trials, "MAX_SIMULATED_CYCLES", 5)
    settings = SimSettings(rate=4.0, duration_s=30.0, seed=2)
    (report,) = await simulations().simulate("", "", "", settings)
    assert report.cycles == 5 and report.jobs_unfinished > 0


async def test_the_largest_allowed_simulation_leaves_the_event_loop_responsive() -> None:
    """19,000 jobs arriving at one instant, the service's worst case: the generation
    runs in a thread and the stepping yields, so a 5 ms timer on the shared loop (the
    one /healthz answers on) is never late by 200 ms."""
    settings = SimSettings(rate=0.0, duration_s=1.5, burst_every_s=1.0, burst_size=19_000)
    assert settings.expected_jobs() <= MAX_SIMULATED_JOBS
    run = asyncio.ensure_future(simulations().simulate("", "", "", settings))
    # 1.5 s: the generation, the engine's start, the burst and the first cycles.
    assert await max_loop_lag_s(run, for_s=1.5) < 0.2
