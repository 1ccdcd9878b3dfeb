"""What a simulation runs on: the workload and the cluster, as one set of named
settings shared by the CLI flags, the HTTP JSON body and AdminService.Simulate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.records import build
from orchestrator.config.settings import MAX_WORKER_SLOTS
from orchestrator.domain.context import INT64_MAX, Catalog
from orchestrator.domain.errors import ConfigError, InvalidRequestError
from orchestrator.domain.prefix import BLOCK_TOKENS, MAX_BLOCK_TOKENS, MIN_BLOCK_TOKENS
from orchestrator.sim.cluster import ClusterSpec
from orchestrator.sim.workload import (
    MAX_SPAN_S,
    Arrival,
    WorkloadSpec,
    detect_format,
    from_trace,
    generate,
    model_map,
    token_range,
    weighted,
)

MAX_JOBS = 1_000_000  # jobs of a generated workload, even locally (the service allows fewer)
MAX_TEXT = 4096  # characters of a text setting (mixes, token ranges)
MAX_MIX = 100  # entries of a tenant or model mix
# (lowest, highest) of every numeric setting. The cluster's size, the arrivals and the
# simulated span are what a simulation's CPU time grows with, so each is capped; a
# request beyond a bound is refused with the field's name, before anything is built.
BOUNDS: dict[str, tuple[float, float]] = {
    "pools": (1, 64),
    "workers_per_pool": (1, 256),
    "gpus_per_pool": (0, 64),
    "worker_slots": (1, MAX_WORKER_SLOTS),
    "start_delay_ms": (0, 3_600_000),
    "evict_delay_ms": (0, 3_600_000),
    "deadline_ms": (1, 10_000),
    "queue_depth": (0, MAX_JOBS),
    "rate": (0, 10_000),
    "duration_s": (0, MAX_SPAN_S),
    "jobs": (0, MAX_JOBS),
    "burst_every_s": (0, MAX_SPAN_S),
    "burst_size": (0, MAX_JOBS),
    "interactive": (0, 1),
    "seed": (-INT64_MAX - 1, INT64_MAX),
    "speedup": (0, 1_000_000),
    "trace_limit": (0, MAX_JOBS),
    "conversation": (0, 1),
    "block_tokens": (MIN_BLOCK_TOKENS, MAX_BLOCK_TOKENS),
    "drain_limit_s": (0, MAX_SPAN_S),
}
POSITIVE = frozenset({"speedup"})  # a float bound whose lowest value is excluded
MIN_BURST_EVERY_S = 0.001  # the simulated clock counts milliseconds


@dataclass(frozen=True)
class SimSettings:
    # the cluster
    pools: int = 2
    workers_per_pool: int = 4
    gpus_per_pool: int = 0  # 0: one GPU for every two workers
    worker_slots: int = ClusterSpec.worker_slots  # jobs one worker runs at once
    start_delay_ms: int = ClusterSpec.start_delay_ms
    evict_delay_ms: int = ClusterSpec.evict_delay_ms
    deadline_ms: int = 50
    # After the last arrival, unfinished jobs get this long; then the run stops and the
    # report says what was left and why.
    drain_limit_s: float = 600.0
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
    conversation: float = 0.0  # share of arrivals that continue an earlier conversation
    # Tokens of a prompt block: of a conversation's prompt_block_ids, and what the
    # simulated prefix caches count in. A Mooncake trace's blocks are 512 tokens.
    block_tokens: int = BLOCK_TOKENS
    # trace replay instead of generated arrivals (CLI only: it reads a local file)
    trace: str | None = None
    speedup: float = 1.0
    trace_models: str = ""  # "2048:llama-8b,inf:qwen-14b" by prompt length
    trace_limit: int = 0
    trace_time_unit: str = "auto"  # numeric timestamps: auto (JSONL ms, CSV s), s or ms

    def __post_init__(self) -> None:
        """Pure validation of every field. InvalidRequestError names the field; a mix or
        range that does not parse is a ConfigError naming it. The workload's size is the
        caller's to cap (expected_jobs): the service allows fewer jobs than the CLI."""
        for name, (low, high) in BOUNDS.items():
            _check_bound(name, getattr(self, name), low, high)
        if 0 < self.burst_every_s < MIN_BURST_EVERY_S:
            raise InvalidRequestError(
                "burst_every_s", f"must be 0 (no bursts) or at least {MIN_BURST_EVERY_S}"
            )
        texts = ("tenants", "models", "prompt_tokens", "output_tokens", "trace_models")
        for name in (*texts, "trace_time_unit"):
            if len(getattr(self, name)) > MAX_TEXT:
                raise InvalidRequestError(name, f"at most {MAX_TEXT} characters")
        for name in ("tenants", "models"):
            if len(weighted(getattr(self, name), name)) > MAX_MIX:
                raise InvalidRequestError(name, f"at most {MAX_MIX} entries")
        token_range(self.prompt_tokens, "prompt_tokens")
        token_range(self.output_tokens, "output_tokens")
        if self.trace:
            return  # a local file: its length is the operator's, trace_limit bounds it
        if self.jobs and self.rate and self.jobs / self.rate > MAX_SPAN_S:
            raise InvalidRequestError(
                "jobs",
                f"{self.jobs} arrivals at {self.rate}/s take about {self.jobs / self.rate:.0f} "
                f"simulated seconds; at most {MAX_SPAN_S:.0f}",
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "workload") -> SimSettings:
        """From JSON or a proto's set fields; unknown keys and bad values name the field."""
        if "trace" in data:
            raise ConfigError(f"{where}.trace: trace replay is available from the CLI only")
        try:
            return build(cls, data, where)
        except InvalidRequestError as exc:
            # The field as the request spells it: "workload.pools".
            reason = str(exc).removeprefix(f"{exc.field}: ")
            raise InvalidRequestError(f"{where}.{exc.field}", reason) from None

    def cluster(self) -> ClusterSpec:
        return ClusterSpec(
            pools=self.pools,
            workers_per_pool=self.workers_per_pool,
            gpus_per_pool=self.gpus_per_pool,
            worker_slots=self.worker_slots,
            start_delay_ms=self.start_delay_ms,
            evict_delay_ms=self.evict_delay_ms,
            block_tokens=self.block_tokens,
        )

    def expected_jobs(self) -> int:
        """At most how many jobs the workload holds, known before generating it: the
        queue at t=0, then `jobs` arrivals, or else the Poisson arrivals and every
        burst within the duration. arrivals() never generates more (its ceiling), so
        a cap checked against this number holds. A trace: its trace_limit (0: all)."""
        if self.trace:
            return self.trace_limit
        if self.jobs:  # arrivals and bursts alike stop at `jobs`
            return self.queue_depth + self.jobs
        mean = self.rate * self.duration_s
        poisson = int(mean + 6 * math.sqrt(mean)) + 10  # six standard deviations above
        bursts = 0
        if self.burst_every_s > 0 and self.burst_size > 0:
            # Bursts at every multiple of burst_every_s within the duration; with
            # Poisson arrivals, the one due just after the end lands too.
            count = int(self.duration_s / self.burst_every_s) + (1 if self.rate > 0 else 0)
            bursts = count * self.burst_size
        return self.queue_depth + poisson + bursts

    def arrivals(self, catalog: Catalog) -> list[Arrival]:
        """The generated arrivals, or the trace's. ConfigError names what is wrong: an
        unknown model, a bad trace line (file:line), or block_tokens other than 512 for
        a trace any row of which has hash_ids (its block ids would stand for blocks
        of another size)."""
        tenants = weighted(self.tenants, "tenants")
        if self.trace:
            aliases = sorted(catalog.aliases) or sorted(catalog.models)
            mapping = model_map(self.trace_models or f"inf:{aliases[0]}")
            for _, model in mapping:
                _known(catalog, model, "trace_models")
            arrivals = from_trace(
                Path(self.trace),
                models=mapping,
                tenants=tenants,
                speedup=self.speedup,
                limit=self.trace_limit,
                interactive=self.interactive,
                seed=self.seed,
                time_unit=self.trace_time_unit,
            )
            # Any row's hash_ids, not only the first's: the ids stand for 512-token blocks.
            blocks = any(a.prompt_block_ids for a in arrivals)
            if blocks and self.block_tokens != BLOCK_TOKENS:
                raise ConfigError(
                    f"block_tokens: a trace's hash_ids are blocks of {BLOCK_TOKENS} tokens "
                    f"(Mooncake's), got {self.block_tokens}"
                )
            return arrivals
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
            ceiling=self.expected_jobs(),
            conversation=self.conversation,
            block_tokens=self.block_tokens,
        )
        return generate(spec, tuple(sorted(catalog.aliases) or sorted(catalog.models)))

    def workload(self) -> dict[str, Any]:
        """The workload half, for the report; a trace's with its detected format
        (trace_format), read from the file's first lines."""
        skip = {
            "pools",
            "workers_per_pool",
            "gpus_per_pool",
            "worker_slots",
            "start_delay_ms",
            "evict_delay_ms",
            "deadline_ms",
            "drain_limit_s",
        }
        trace_only = {"trace", "speedup", "trace_models", "trace_limit", "trace_time_unit"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if not self.trace:
            out = {k: v for k, v in out.items() if k not in trace_only}
        else:
            out["trace_format"] = detect_format(Path(self.trace))
        return out

    def with_seed(self, seed: int) -> SimSettings:
        return dataclasses.replace(self, seed=seed)


def _check_bound(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(name, f"must be a finite number, got {value}")
    if name in POSITIVE and value <= low:
        raise InvalidRequestError(name, f"must be positive, got {value}")
    if value < low:
        floor = "must not be negative" if low == 0 else f"must be at least {low}"
        raise InvalidRequestError(name, f"{floor}, got {value}")
    if value > high:
        raise InvalidRequestError(name, f"must be at most {high}, got {value}")


def _known(catalog: Catalog, model: str, what: str) -> None:
    if catalog.get(model) is None:
        names = ", ".join(sorted(catalog.aliases) or sorted(catalog.models))
        raise ConfigError(f"{what}: {model!r} is not in the catalog (known: {names})")
