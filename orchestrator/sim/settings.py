"""What a simulation runs on: the workload and the cluster, as one set of named
settings shared by the CLI flags, the HTTP JSON body and AdminService.Simulate."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.records import build
from orchestrator.domain.context import Catalog
from orchestrator.domain.errors import ConfigError
from orchestrator.sim.cluster import ClusterSpec
from orchestrator.sim.workload import (
    Arrival,
    WorkloadSpec,
    from_trace,
    generate,
    model_map,
    token_range,
    weighted,
)


@dataclass(frozen=True)
class SimSettings:
    # the cluster
    pools: int = 2
    workers_per_pool: int = 4
    gpus_per_pool: int = 0  # 0: one GPU for every two workers
    start_delay_ms: int = ClusterSpec.start_delay_ms
    evict_delay_ms: int = ClusterSpec.evict_delay_ms
    deadline_ms: int = 50
    # the workload
    queue_depth: int = 0  # jobs queued at t = 0
    rate: float = 2.0  # Poisson arrivals per second
    duration_s: float = 30.0  # arrivals for this long...
    jobs: int = 0  # ...or this many arrivals
    burst_every_s: float = 0.0
    burst_size: int = 0
    interactive: float = 0.3  # share of interactive jobs
    tenants: str = ""  # "team-a:3,team-b:1"; empty: no tenants
    models: str = ""  # "llama-8b:2,qwen-14b"; empty: every catalog alias, evenly
    prompt_tokens: str = "100-2000"
    output_tokens: str = "20-400"
    seed: int = 1
    # trace replay instead of generated arrivals (CLI only: it reads a local file)
    trace: str | None = None
    speedup: float = 1.0
    trace_models: str = ""  # "2048:llama-8b,inf:qwen-14b" by prompt length
    trace_limit: int = 0
    trace_time_unit: str = "auto"  # numeric timestamps: auto (JSONL ms, CSV s), s or ms

    def __post_init__(self) -> None:
        positive = ("pools", "workers_per_pool", "deadline_ms", "speedup")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in (
            "gpus_per_pool",
            "queue_depth",
            "rate",
            "duration_s",
            "jobs",
            "burst_every_s",
            "burst_size",
            "start_delay_ms",
            "evict_delay_ms",
            "trace_limit",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 <= self.interactive <= 1:
            raise ValueError("interactive must be a share between 0 and 1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "workload") -> SimSettings:
        """From JSON or a proto's set fields; unknown keys and bad values name the field."""
        if "trace" in data:
            raise ConfigError(f"{where}.trace: trace replay is available from the CLI only")
        return build(cls, data, where)

    def cluster(self) -> ClusterSpec:
        return ClusterSpec(
            pools=self.pools,
            workers_per_pool=self.workers_per_pool,
            gpus_per_pool=self.gpus_per_pool,
            start_delay_ms=self.start_delay_ms,
            evict_delay_ms=self.evict_delay_ms,
        )

    def expected_jobs(self) -> int:
        """About how many jobs the workload holds (for limits, before generating it)."""
        if self.trace:
            return self.trace_limit
        arrivals = self.jobs or int(self.rate * self.duration_s * 1.2) + 10
        bursts = (
            int(self.duration_s / self.burst_every_s) * self.burst_size
            if (self.burst_every_s and not self.jobs)
            else 0
        )
        return self.queue_depth + arrivals + bursts

    def arrivals(self, catalog: Catalog) -> list[Arrival]:
        tenants = weighted(self.tenants, "tenants")
        if self.trace:
            aliases = sorted(catalog.aliases) or sorted(catalog.models)
            mapping = model_map(self.trace_models or f"inf:{aliases[0]}")
            for _, model in mapping:
                _known(catalog, model, "trace_models")
            return from_trace(
                Path(self.trace),
                models=mapping,
                tenants=tenants,
                speedup=self.speedup,
                limit=self.trace_limit,
                interactive=self.interactive,
                seed=self.seed,
            )
        models = weighted(self.models, "models")
        for model, _ in models:
            _known(catalog, model, "models")
        spec = WorkloadSpec(
            rate=self.rate,
            duration_s=self.duration_s,
            jobs=self.jobs,
            burst_every_s=self.burst_every_s,
            burst_size=self.burst_size,
            interactive=self.interactive,
            tenants=tenants,
            models=models,
            prompt_tokens=token_range(self.prompt_tokens, "prompt_tokens"),
            output_tokens=token_range(self.output_tokens, "output_tokens"),
            queue_depth=self.queue_depth,
            seed=self.seed,
        )
        return generate(spec, tuple(sorted(catalog.aliases) or sorted(catalog.models)))

    def workload(self) -> dict[str, Any]:
        """The workload half, for the report."""
        skip = {
            "pools",
            "workers_per_pool",
            "gpus_per_pool",
            "start_delay_ms",
            "evict_delay_ms",
            "deadline_ms",
        }
        trace_only = {"trace", "speedup", "trace_models", "trace_limit", "trace_time_unit"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if not self.trace:
            out = {k: v for k, v in out.items() if k not in trace_only}
        return out

    def with_seed(self, seed: int) -> SimSettings:
        return dataclasses.replace(self, seed=seed)


def _known(catalog: Catalog, model: str, what: str) -> None:
    if catalog.get(model) is None:
        names = ", ".join(sorted(catalog.aliases) or sorted(catalog.models))
        raise ConfigError(f"{what}: {model!r} is not in the catalog (known: {names})")
