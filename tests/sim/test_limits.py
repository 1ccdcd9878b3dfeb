"""The bounds of a simulation's settings, the workload's size known before it is
generated, and a simulation that leaves its event loop free to serve others."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import pytest

from orchestrator.domain.errors import ConfigError, InvalidRequestError
from orchestrator.sim import workload
from orchestrator.sim.run import default_catalog, simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import WorkloadSpec, generate


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pools": 0}, "workload.pools: must be at least 1, got 0"),
        ({"pools": 100_000}, "workload.pools: must be at most 64"),
        ({"workers_per_pool": 10**6}, "workload.workers_per_pool: must be at most 256"),
        ({"gpus_per_pool": 10**6}, "workload.gpus_per_pool: must be at most 64"),
        ({"worker_slots": 0}, "workload.worker_slots: must be at least 1, got 0"),
        ({"worker_slots": 2000}, "workload.worker_slots: must be at most 1024"),
        ({"start_delay_ms": 10**12}, "workload.start_delay_ms: must be at most"),
        ({"evict_delay_ms": -1}, "workload.evict_delay_ms: must not be negative"),
        ({"deadline_ms": 10**9}, "workload.deadline_ms: must be at most 10000"),
        ({"queue_depth": 10**7}, "workload.queue_depth: must be at most 1000000"),
        ({"rate": 1e9}, "workload.rate: must be at most 10000"),
        ({"rate": float("nan")}, "workload.rate: must be a finite number"),
        ({"duration_s": float("inf")}, "workload.duration_s: must be a finite number"),
        ({"duration_s": 1e7}, "workload.duration_s: must be at most 86400"),
        ({"jobs": 10**7}, "workload.jobs: must be at most 1000000"),
        ({"jobs": 1000, "rate": 0.001}, "workload.jobs: 1000 arrivals at 0.001/s take about"),
        ({"burst_every_s": 1e-9, "burst_size": 5}, "workload.burst_every_s: must be 0"),
        ({"burst_size": 10**7}, "workload.burst_size: must be at most 1000000"),
        ({"interactive": 1.5}, "workload.interactive: must be at most 1"),
        ({"seed": 1 << 70}, "workload.seed: must be at most"),
        ({"tenants": ",".join(f"t{i}" for i in range(101))}, "workload.tenants: at most 100"),
        ({"models": "m" * 5000}, "workload.models: at most 4096 characters"),
    ],
)
def test_every_field_is_bounded_and_named(fields: dict[str, Any], message: str) -> None:
    """A request beyond a bound is refused before anything is built; the error names
    the field as the request spells it (INVALID_ARGUMENT)."""
    with pytest.raises(InvalidRequestError, match=message.replace(".", r"\.")) as refused:
        SimSettings.from_mapping(fields)
    assert refused.value.field == f"workload.{next(iter(fields))}"


def test_mixes_and_token_ranges_are_bounded_too() -> None:
    with pytest.raises(ConfigError, match="the weight of 'a' must be positive and finite"):
        SimSettings.from_mapping({"tenants": "a:inf"})
    with pytest.raises(ConfigError, match="output_tokens: at most 1048576 tokens per job"):
        SimSettings.from_mapping({"output_tokens": "1-99999999"})


def test_expected_jobs_bounds_every_generated_workload() -> None:
    """expected_jobs() is known before generating and is never exceeded: queue, Poisson
    arrivals and bursts, including the burst due just after the end of the duration."""
    catalog = default_catalog()
    # Arrivals at 0.01/s for 1 s, bursts every 1.5 s: the first arrival comes long
    # after 1.5 s, so the burst at 1.5 s lands (it was not counted: 10 jobs expected).
    late = SimSettings(rate=0.01, duration_s=1.0, burst_every_s=1.5, burst_size=500)
    assert len(late.arrivals(catalog)) == 500 <= late.expected_jobs()
    rng = random.Random(7)
    for seed in range(300):
        settings = SimSettings(
            rate=rng.choice([0.0, 0.02, 1.0, 7.0]),
            duration_s=rng.choice([0.0, 1.0, 2.9, 10.0]),
            jobs=rng.choice([0, 0, 1, 9]),
            burst_every_s=rng.choice([0.0, 0.7, 1.0, 3.0]),
            burst_size=rng.choice([0, 1, 30]),
            queue_depth=rng.choice([0, 4]),
            seed=seed,
        )
        assert len(settings.arrivals(catalog)) <= settings.expected_jobs(), settings


def test_a_burst_past_the_jobs_limit_is_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """`jobs` limits bursts too, and generation stops there: a burst of 100,000 with
    jobs=3 builds 3 jobs, not 100,000 to keep 3 (300,000 held the event loop 3 s)."""
    built = itertools.count()
    real = workload.Arrival

    def counted(*args: Any, **kwargs: Any) -> workload.Arrival:
        next(built)
        return real(*args, **kwargs)

    monkeypatch.setattr(workload, "Arrival", counted)
    spec = WorkloadSpec(rate=0.0, duration_s=5.0, jobs=3, burst_every_s=1.0, burst_size=100_000)
    assert [a.at_ms for a in generate(spec, ("m",))] == [1000, 1000, 1000]
    assert next(built) == 3
    settings = SimSettings(rate=0.0, duration_s=5.0, jobs=3, burst_every_s=1.0, burst_size=100_000)
    assert settings.expected_jobs() == 3


async def max_loop_lag_s(run: asyncio.Task[object], for_s: float) -> float:
    """The longest the event loop left a 5 ms timer waiting while `run` ran (for at
    most `for_s`; then `run` is cancelled)."""
    lag = 0.0
    end = time.perf_counter() + for_s
    while not run.done() and time.perf_counter() < end:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        lag = max(lag, time.perf_counter() - before - 0.005)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    return lag


async def test_a_large_simulation_leaves_the_event_loop_responsive() -> None:
    """Generating 60,000 jobs (0.3 s of Python) runs in a thread, and stepping through
    them yields between engine calls: the loop the simulation shares (the service's)
    keeps answering within a generous 200 ms."""
    settings = SimSettings(rate=15.0, duration_s=4000.0, seed=3)
    assert settings.expected_jobs() > 60_000
    run = asyncio.ensure_future(simulate(None, "platform", settings))
    assert await max_loop_lag_s(run, for_s=1.5) < 0.2
