"""Workloads for the simulator: generated (Poisson arrivals, bursts, mixes) or replayed
from a trace (the Azure LLM inference CSV, or JSONL with timestamp/input_length/
output_length). Pure and deterministic for a given seed.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from orchestrator.domain.errors import ConfigError

MAX_TOKENS = 1 << 20  # prompt or output tokens of one simulated job


@dataclass(frozen=True)
class Arrival:
    at_ms: int
    job_id: str
    model: str  # an alias or model_ref of the catalog
    priority: str
    tenant_id: str | None
    prompt_tokens: int
    output_tokens: int
    seed: int | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    rate: float = 2.0  # arrivals per second (Poisson)
    duration_s: float = 30.0  # arrivals stop after this much simulated time
    jobs: int = 0  # if set, stop after this many arrivals instead
    burst_every_s: float = 0.0  # every so often, `burst_size` extra jobs at once
    burst_size: int = 0
    interactive: float = 0.3  # share of interactive jobs
    tenants: tuple[tuple[str, float], ...] = ()  # (tenant, weight); none: no tenants
    models: tuple[tuple[str, float], ...] = ()  # (alias or ref, weight)
    prompt_tokens: tuple[int, int] = (100, 2000)
    output_tokens: tuple[int, int] = (20, 400)
    seeded: float = 0.2  # share of jobs that carry a seed
    queue_depth: int = 0  # jobs already queued at t = 0 (runtime-spec 10.3's --queue-depth)
    seed: int = 1
    # Never more jobs than this, whatever the rest says (0: no ceiling). SimSettings sets
    # it to its expected_jobs(), so a cap checked against that holds by construction.
    ceiling: int = 0


def weighted(text: str, what: str) -> tuple[tuple[str, float], ...]:
    """ "a:2,b:1" (or "a,b") as ((a, 2.0), (b, 1.0))."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"{what}: {part!r} is not NAME or NAME:WEIGHT") from None
        if not 0 < value < math.inf:  # NaN too: random.choices needs finite weights
            raise ConfigError(f"{what}: the weight of {name!r} must be positive and finite")
        out.append((name, value))
    return tuple(out)


def token_range(text: str, what: str) -> tuple[int, int]:
    """ "100-2000" as (100, 2000)."""
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"{what}: expected MIN-MAX, got {text!r}") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"{what}: expected 0 < MIN <= MAX, got {text!r}")
    if hi > MAX_TOKENS:
        raise ConfigError(f"{what}: at most {MAX_TOKENS} tokens per job, got {text!r}")
    return lo, hi


def _pick(rng: random.Random, choices: tuple[tuple[str, float], ...]) -> str:
    names = [c[0] for c in choices]
    return rng.choices(names, weights=[c[1] for c in choices])[0]


def generate(spec: WorkloadSpec, models: tuple[str, ...]) -> list[Arrival]:
    """Arrivals for a spec; `models` are used uniformly when the spec names none."""
    rng = random.Random(spec.seed)
    mix = spec.models or tuple((m, 1.0) for m in models)
    if not mix:
        raise ConfigError("the workload needs at least one model")

    def job(index: int, at_ms: int) -> Arrival:
        return Arrival(
            at_ms=at_ms,
            job_id=f"sim-{index:06d}",
            model=_pick(rng, mix),
            priority="interactive" if rng.random() < spec.interactive else "batch",
            tenant_id=_pick(rng, spec.tenants) if spec.tenants else None,
            prompt_tokens=rng.randint(*spec.prompt_tokens),
            output_tokens=rng.randint(*spec.output_tokens),
            seed=rng.randrange(1 << 31) if rng.random() < spec.seeded else None,
        )

    counted = spec.jobs > 0  # arrivals stop after `jobs` of them, else after `duration_s`
    limit = min(  # `jobs` after the queue, and the ceiling; 0 is no limit
        (n for n in (spec.jobs + spec.queue_depth if counted else 0, spec.ceiling) if n),
        default=sys.maxsize,
    )
    out = [job(i, 0) for i in range(min(spec.queue_depth, limit))]
    end_ms = spec.duration_s * 1000
    t = 0.0
    # A burst of no jobs would only spin this loop: with a tiny `burst_every_s`, for long.
    bursts = spec.burst_every_s > 0 and spec.burst_size > 0
    next_burst = spec.burst_every_s * 1000 if bursts else math.inf
    while (spec.rate > 0 or next_burst < end_ms) and len(out) < limit:
        gap = rng.expovariate(spec.rate) * 1000 if spec.rate > 0 else math.inf
        if next_burst <= t + gap:
            t = next_burst
            # Stop at the limit inside a burst too: building jobs to drop them cost
            # seconds of the event loop (burst_size=300000 with jobs=1).
            for _ in range(min(spec.burst_size, limit - len(out))):
                out.append(job(len(out), int(t)))
            next_burst += spec.burst_every_s * 1000
        else:
            t += gap
            if not counted and t > end_ms:
                break
            out.append(job(len(out), int(t)))
        if not counted and t > end_ms:
            break
    return out


def model_map(text: str) -> tuple[tuple[float, str], ...]:
    """ "2048:llama-8b,8192:mistral-7b,inf:qwen-14b": prompt-length ceilings to models."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        ceiling, _, model = part.partition(":")
        try:
            limit = math.inf if ceiling in ("inf", "*") else float(ceiling)
        except ValueError:
            raise ConfigError(f"--trace-models: {part!r} is not CEILING:MODEL") from None
        out.append((limit, model))
    if not out:
        raise ConfigError("--trace-models: expected CEILING:MODEL[,CEILING:MODEL...]")
    return tuple(sorted(out))


def from_trace(
    path: Path,
    *,
    models: tuple[tuple[float, str], ...],
    tenants: tuple[tuple[str, float], ...] = (),
    speedup: float = 1.0,
    limit: int = 0,
    interactive: float = 0.3,
    seed: int = 1,
    time_unit: str = "auto",
) -> list[Arrival]:
    """Replay a trace's arrivals (times divided by `speedup`); prompt length picks the model."""
    if speedup <= 0:
        raise ConfigError("--speedup must be positive")
    if time_unit not in ("auto", "s", "ms"):
        raise ConfigError(f"--trace-time-unit: expected auto, s or ms, got {time_unit!r}")
    rows = _read_trace(path, time_unit)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ConfigError(f"{path}: the trace holds no requests")
    rng = random.Random(seed)
    start = rows[0][0]
    out = []
    for index, (at, prompt, output) in enumerate(rows):
        model = next((m for ceiling, m in models if prompt <= ceiling), models[-1][1])
        out.append(
            Arrival(
                at_ms=int((at - start) * 1000 / speedup),
                job_id=f"trace-{index:06d}",
                model=model,
                priority="interactive" if rng.random() < interactive else "batch",
                tenant_id=_pick(rng, tenants) if tenants else None,
                prompt_tokens=max(1, prompt),
                output_tokens=max(1, output),
            )
        )
    return out


def _read_trace(path: Path, time_unit: str) -> list[tuple[float, int, int]]:
    """(seconds, prompt tokens, output tokens) rows, in time order. Numeric timestamps
    are in `time_unit`; "auto" means milliseconds in JSONL (the Mooncake traces' unit)
    and seconds in CSV. Date-time strings are read as such in both."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    rows: list[tuple[float, int, int]] = []
    if path.suffix in (".jsonl", ".ndjson") or text.lstrip().startswith("{"):
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append(
                    (
                        _seconds(record["timestamp"], "ms" if time_unit == "auto" else time_unit),
                        int(record["input_length"]),
                        int(record["output_length"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{line_no}: expected timestamp, input_length, output_length ({exc})"
                ) from None
    else:
        reader = csv.DictReader(text.splitlines())
        needed = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not needed <= {f.strip() for f in reader.fieldnames}:
            raise ConfigError(f"{path}: expected the columns {', '.join(sorted(needed))}")
        for line_no, record in enumerate(reader, 2):
            try:
                stamp = record["TIMESTAMP"].strip()
                seconds = _seconds(stamp, "s" if time_unit == "auto" else time_unit)
                rows.append((seconds, int(record["ContextTokens"]), int(record["GeneratedTokens"])))
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"{path}:{line_no}: {exc}") from None
    rows.sort(key=lambda r: r[0])
    return rows


def _seconds(stamp: str | float, unit: str) -> float:
    try:
        return float(stamp) / (1000 if unit == "ms" else 1)
    except ValueError:
        pass
    assert isinstance(stamp, str)
    # "2023-11-16 18:17:03.9799600": Python takes at most 6 digits of fraction.
    main, _, fraction = stamp.partition(".")
    value = datetime.fromisoformat(main).timestamp()
    return value + (float("0." + fraction) if fraction else 0.0)
