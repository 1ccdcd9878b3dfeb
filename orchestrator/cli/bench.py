"""`orchestratord bench` (`make bench`): the figures in BENCHMARKS.md.

Every figure is measured in one run on this machine, with medians and p99s, and set
side by side with its floor where there is one (a bare gRPC echo on the same socket,
the same script in-process without isolation). `--quick` runs small versions for the
regression guard in the tests, which assert only generous ratios.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import lupa.luajit21
import yaml

from orchestrator._proto import sandbox_pb2
from orchestrator.cli import bench_engine, bench_service
from orchestrator.config.credentials import new_token, token_hash
from orchestrator.config.settings import (
    SPAWN_METHODS,
    SchedulerConfig,
    ServiceConfig,
    load_config,
)
from orchestrator.domain.context import Context, Job, derive_metrics
from orchestrator.domain.samples import MODELS, flip_workers, sample_context
from orchestrator.domain.samples import synthetic_cluster as cluster
from orchestrator.sandbox.limits import MiB, SandboxLimits
from orchestrator.sandbox.process import SchedulerSpec, WorkerProcess
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine, platform_source
from orchestrator.sim.run import simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.state.jobqueue import JobQueue
from orchestrator.state.journal import SnapshotJournal
from orchestrator.wire.channel import ClientAuth, open_channel
from sandbox_worker.runtime import LuaSchedulerRuntime

ENTRY_POINT = bench_engine.FAST_SCRIPT  # runtime-spec section 2
# A script that reads no job: what a cycle costs besides the script's own work, for the
# growth table (the entry point reads ctx.queue, and building its copy grows with it).
QUEUE_BLIND = """
function schedule(ctx)
  if ctx.metrics.queue_depth > 0 and ctx.metrics.ready_workers == 0 then
    return { action = "wait", reason = "no_ready_worker" }
  end
  return { action = "wait" }
end
"""


# In a checkout of the repository; an installed package has no tests/ and skips it.
TRACES = Path(__file__).resolve().parents[2] / "tests" / "data" / "traces"
TRACE = TRACES / "azure-llm-inference-2023-code.csv"


@dataclass
class Figure:
    name: str
    median: float
    p99: float
    unit: str = "ms"
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class Growth:
    jobs: int
    median: float  # the sandboxed delta cycle, with a script that reads no job
    p99: float
    entry_point: float  # the same with the entry point, which reads ctx.queue
    floor: float  # the first in-process
    full: float  # a full resync


# The growth table's sizes, and its churn: the same absolute change per cycle at every
# size (1% of 10,000 jobs), so that what grows is the queue, not what changed.
GROWTH_SIZES = (1_000, 10_000, 100_000, 1_000_000)
GROWTH_CHURN = 100


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    growth: list[Growth] = field(default_factory=list)
    runtimes: list[tuple[str, str, float, float]] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), pct(values, 0.99)


def engine(user: str | None, *, language: str = "luajit", deadline_ms: int = 5000,
           spares: int = 0, limits: SandboxLimits | None = None) -> SchedulingEngine:  # fmt: skip
    options = EngineOptions.from_config(
        SchedulerConfig(deadline_ms=deadline_ms), spares=spares,
        breaker_threshold=1_000_000,  # measure every failure
    )  # fmt: skip
    if limits is not None:
        options = dataclasses.replace(
            options, limits=dataclasses.replace(limits, deadline_ms=deadline_ms)
        )
    return SchedulingEngine(user_source=user, language=language, options=options)


async def timed(fn: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


class ChurnedCluster:
    """A synthetic cluster driven the way the live core drives its own (issue 17).

    Jobs arrive and leave through the live queue (state/jobqueue.py), which logs the
    changes as they happen; a pool is replaced only when one of its workers changed.
    `events` is the cluster changing between cycles (not timed); `context` is what the
    cluster state does at the start of a cycle: a queue snapshot, the logged changes,
    the metrics from running totals. Both leave the queue's length out of the cost.
    """

    def __init__(self, n_jobs: int, n_workers: int) -> None:
        base = cluster(n_jobs, n_workers)
        self.queue = JobQueue()
        for job in base.queue:
            self.queue.insert(job)
        self.order = deque(job.id for job in base.queue)  # arrivals go last: all batch
        self.queue.take_changes(None)  # the first context goes in full
        self.ctx = dataclasses.replace(base, queue=self.queue.snapshot())
        self.pools = base.pools
        self.now_ms = base.now_ms

    def events(self, step: int, jobs: int, workers: int) -> None:
        """`jobs` jobs leave from the head of the queue and as many arrive; `workers`
        workers flip between ready and busy."""
        for _ in range(jobs):
            self.queue.remove(self.order.popleft())
        for i in range(jobs):
            job = Job(f"job-s{step}-{i}", MODELS[i % 3], "batch", queued_at=self.now_ms + 1,
                      max_tokens=100)  # fmt: skip
            self.queue.insert(job)
            self.order.append(job.id)
        self.pools = flip_workers(self.pools, step, workers)
        self.now_ms += 100

    def context(self) -> Context:
        queue = self.queue.snapshot()
        self.ctx = dataclasses.replace(
            self.ctx, now_ms=self.now_ms, queue=queue, pools=self.pools,
            metrics=derive_metrics(queue, self.pools, self.now_ms, totals=queue.totals()),
            changes=self.queue.take_changes(self.ctx),
        )  # fmt: skip
        return self.ctx


# ---------------------------------------------------------------- the figures
async def decision_vs_echo(report: Report, count: int, rounds: int = 5) -> None:
    """1. The platform scheduler at 10 jobs and 8 workers against a bare echo of the
    same size on the same socket, in alternating rounds: the ratio's spread is over
    the rounds' medians."""
    ctx = sample_context()
    async with engine(None) as eng:

        async def cycle() -> None:
            nonlocal ctx
            ctx = dataclasses.replace(ctx, now_ms=ctx.now_ms + 1)
            await eng.schedule(ctx)

        await timed(cycle, 100)  # warm up (JIT, caches)
        worker = eng.platform.active
        assert worker is not None and worker.stub is not None
        eng.journal.advance(dataclasses.replace(ctx, now_ms=ctx.now_ms + 1))
        request = eng.journal.request_for(worker.epoch, worker.seq)
        size = request.ByteSize()
        stub = worker.stub
        payload = sandbox_pb2.EchoMessage(payload=b"x" * size)

        async def echo() -> None:
            await stub.Echo(payload)

        async def rpc_only() -> None:
            await worker.schedule(eng.journal.request_for(worker.epoch, worker.seq), 5)

        cycles: list[float] = []
        echoes: list[float] = []
        rpcs: list[float] = []
        per_round = []
        for _ in range(rounds):
            c = await timed(cycle, count // rounds)
            e = await timed(echo, count // rounds)
            r = await timed(rpc_only, count // rounds)
            cycles += c
            echoes += e
            rpcs += r
            per_round.append(statistics.median(c) / statistics.median(e))
    (cm, cp), (em, ep), (rm, rp) = summary(cycles), summary(echoes), summary(rpcs)
    ratio = cm / em
    report.figures += [
        Figure("decision round trip, platform scheduler, 10 jobs / 8 workers", cm, cp,
               ratio=f"{ratio:.2f}x echo (p99 {cp / ep:.2f}x; rounds {spread(per_round)})",
               target="<= 1.5x echo", met=ratio <= 1.5,
               note=f"whole engine cycle: delta, RPC, Lua, validation; {rounds} rounds of "
               f"{count // rounds} cycles, echoes and bare Schedule RPCs in turn"),
        Figure("  of which the Schedule RPC alone", rm, rp, ratio=f"{rm / em:.2f}x echo"),
        Figure(f"  bare gRPC echo, {size} B, same socket", em, ep),
    ]  # fmt: skip


def spread(values: list[float], unit: str = "x") -> str:
    """The range of per-round figures, for a ratio's spread over rounds."""
    return f"{min(values):.2f}{unit} to {max(values):.2f}{unit}"


async def cycle_cost(n_jobs: int, n_workers: int, count: int, language: str = "luajit",
                     churn_jobs: int | None = None,
                     script: str = ENTRY_POINT) -> tuple[list[float], list[float]]:  # fmt: skip
    """2, 3. Delta cycles and full resyncs at one size: each cycle is the context built
    from the cluster's logged changes, then the engine's whole cycle (delta, RPC,
    script, validation). Churn: `churn_jobs` jobs replaced (1% of the queue by
    default) and 1% of the workers flipped per cycle."""
    jobs = max(1, n_jobs // 100) if churn_jobs is None else churn_jobs
    workers = max(1, n_workers // 100)
    driven = ChurnedCluster(n_jobs, n_workers)
    async with engine(script, language=language, limits=_limits_for(n_jobs)) as eng:
        await eng.schedule(driven.ctx)
        deltas = []
        for step in range(count):
            driven.events(step, jobs, workers)
            started = time.perf_counter()
            result = await eng.schedule(driven.context())
            deltas.append((time.perf_counter() - started) * 1000)
            assert result.source == "user", result.error
        fulls = []
        worker = eng.user.active if eng.user else None
        assert worker is not None
        for step in range(max(3, count // 20)):
            driven.events(count + step, jobs, workers)
            worker.epoch = 0  # as if it had restarted: it gets the full snapshot
            started = time.perf_counter()
            await eng.schedule(driven.context())
            fulls.append((time.perf_counter() - started) * 1000)
    return deltas, fulls


def _limits_for(n_jobs: int) -> SandboxLimits:
    """The default limits, with room for a million queued jobs (about 120 MB on the
    wire, and Lua masters for each job) where the growth table asks for them."""
    if n_jobs <= 100_000:
        return SandboxLimits()
    return SandboxLimits(address_space_bytes=8 * 1024 * MiB, lua_heap_bytes=256 * MiB)


async def runaway(report: Report) -> None:
    """4. From a runaway script to the fallback decision, hedged (the platform's answer
    started beside the script) and not, in rounds (scheduling/hedge.py)."""
    hedged = await bench_engine.runaway_to_fallback()
    plain = await bench_engine.runaway_to_fallback(hedge=False)
    m, p = hedged.median, hedged.p99
    report.figures += [
        Figure("runaway script to fallback decision (budget 50 ms), hedged", m, p,
               ratio=f"budget + {m - 50:.1f} ms (p99 + {p - 50:.1f}); round medians "
               f"{spread([v - 50 for v in hedged.round_medians], ' ms')} over budget",
               target="<= budget + 10 ms", met=m <= 60,
               note="SIGKILL at the deadline; the platform scheduler's decision was started "
               "in its own sandbox at the hedge point (deadline - its recent latency - 10 ms)"),
        Figure("  the same without hedging", plain.median, plain.p99,
               ratio=f"budget + {plain.median - 50:.1f} ms"),
    ]  # fmt: skip


async def crash_to_spare(report: Report) -> None:
    """5. From a worker crash to the next decision served by a spare."""
    crash, resyncs = await bench_engine.crash_to_spare()
    report.figures.append(
        Figure("worker crash to the next decision served by a spare", crash.median, crash.p99,
               ratio=f"round p99s {spread(list(crash.round_p99s), ' ms')}",
               target="p99 <= 5 ms", met=crash.p99 <= 5,
               note="killed between cycles, timed from the process being gone; the spare "
               f"already held the snapshot: {resyncs:.0f} full snapshots sent in those cycles")
    )  # fmt: skip


async def hedge_cost(report: Report) -> None:
    """What hedging costs in CPU when nothing fails (core and platform workers)."""
    cost = await bench_engine.hedge_cpu_cost()
    for name, c in (("nothing fails", cost.nothing_fails),
                    ("every hedge started, then discarded", cost.hedges_discarded)):  # fmt: skip
        off = statistics.median(c.core_off) + statistics.median(c.platform_off)
        on = statistics.median(c.core_on) + statistics.median(c.platform_on)
        report.figures.append(
            Figure(f"CPU per cycle, core + platform workers, hedging on: {name}", on, on,
                   ratio=f"+{on - off:.2f} ms ({(on - off) / off:+.0%}) against hedging off",
                   note=f"median of rounds; off: {off:.2f} ms; hedges per cycle "
                   f"{c.hedges_per_cycle:.2f}")
        )  # fmt: skip


async def service(report: Report) -> None:
    """Requests per second through the whole service (orchestrator/cli/bench_service.py)."""
    for api in ("grpc", "openai"):
        result = await bench_service.service_throughput(api)
        report.figures += [Figure(**kw) for kw in result.figures()]


def _cpu_ms(pid: int) -> float:
    """User + system CPU a process has used so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def spawn_cost(report: Report, count: int) -> None:
    """Spawning a worker until it has loaded a script: fork server against exec,
    alternated so that both see the same machine."""
    times: dict[str, list[float]] = {method: [] for method in SPAWN_METHODS}
    cpu: dict[str, list[float]] = {method: [] for method in SPAWN_METHODS}
    specs = {m: SchedulerSpec("bench.lua", ENTRY_POINT, platform_source(), spawn=m)
             for m in SPAWN_METHODS}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        for i in range(-1, count):  # -1: starts the fork server, off the record
            for method, spec in specs.items():
                worker = WorkerProcess(spec, Path(tmp), f"s{i}{method[0]}")
                started = time.perf_counter()
                await worker.start()
                if i >= 0:
                    times[method].append((time.perf_counter() - started) * 1000)
                    cpu[method].append(_cpu_ms(worker.pid))
                worker.kill()
                await asyncio.sleep(0.05)  # let the kill and cleanup finish off the clock
    (fm, fp), (em, ep) = summary(times["fork-server"]), summary(times["exec"])
    fc, ec = statistics.median(cpu["fork-server"]), statistics.median(cpu["exec"])
    report.figures += [
        Figure("worker spawn to script loaded, fork server", fm, fp,
               ratio=f"{em / fm:.1f}x faster than exec (median)",
               note=f"the worker's own CPU: {fc:.0f} ms, against {ec:.0f} ms exec'd"),
        Figure("  worker spawn to script loaded, exec", em, ep,
               note="a new interpreter: Python start-up and imports of gRPC, protobuf, lupa"),
    ]  # fmt: skip


async def throughput_and_rss(report: Report, count: int) -> float:
    """6, 8. Decisions per second for one worker (returned); RSS per sandbox worker."""
    base = sample_context()
    async with engine(None) as eng:
        started = time.perf_counter()
        for i in range(count):
            await eng.schedule(dataclasses.replace(base, now_ms=base.now_ms + i))
        rate = count / (time.perf_counter() - started)
        worker = eng.platform.active
        assert worker is not None
        small = (await worker.health()).rss_bytes
    big = cluster(10_000, 1024)
    async with engine(ENTRY_POINT) as eng:
        await eng.schedule(big)
        assert eng.user is not None and eng.user.active is not None
        health = await eng.user.active.health()
    report.figures.append(
        Figure("decisions per second, one worker (sample context, sequential)", rate, rate,
               unit="/s", note="median column: the rate; one cycle at a time")
    )  # fmt: skip
    report.figures.append(
        Figure("RSS per sandbox worker: loaded, sample context", small / 2**20, small / 2**20,
               unit="MiB")
    )  # fmt: skip
    report.figures.append(
        Figure("RSS per sandbox worker: 10,000 jobs / 1,024 workers", health.rss_bytes / 2**20,
               health.rss_bytes / 2**20, unit="MiB",
               note=f"Lua heap {health.lua_memory_bytes / 2**20:.1f} MiB")
    )  # fmt: skip
    return rate


async def simulated(report: Report, cycles: int, one_worker_rate: float | None) -> None:
    """Simulated decisions per second: the platform scheduler at 10,000 queued jobs,
    4 pools and 16 workers per pool, through the real sandbox, validator and fallback."""
    settings = SimSettings(queue_depth=10_000, rate=0.0, pools=4, workers_per_pool=16)
    sim = await simulate(None, "platform", settings, max_cycles=cycles)
    rate = sim.cycles / sim.wall_s
    ratio = f"{rate / one_worker_rate:.2f}x the sample-context rate" if one_worker_rate else ""
    report.figures.append(
        Figure("simulated decisions per second, platform, 10,000 jobs, 4 pools x 16 workers",
               rate, rate, unit="/s", ratio=ratio,
               note=f"first {sim.cycles} cycles, {sim.simulated_s:.0f} s simulated in "
               f"{sim.wall_s:.1f} s; each cycle builds the context, diffs it, runs the script "
               "in its sandbox and validates; fallbacks "
               f"{sim.fallbacks}")
    )  # fmt: skip
    latency = sim.decision_latency_ms
    report.figures.append(
        Figure("decision latency inside that simulation", latency["p50"], latency["p99"],
               note="engine cycle only (journal diff, RPC, script, validation)")
    )  # fmt: skip


async def trace_replay(report: Report, rounds: int) -> None:
    """The public Azure code trace (8,819 requests, one hour), replayed in full
    `rounds` times, each as an operator runs it: `scheduler simulate --json` in a
    process of its own (this one holds the heaps of every figure before, which its
    collector walks). Wall time, and requests simulated per wall second."""
    if not TRACE.exists():
        return
    command = [
        sys.executable, "-m", "orchestrator.cli", "scheduler", "simulate", "--file", "platform",
        "--trace", str(TRACE), "--trace-models", "2048:llama-8b,8192:mistral-7b,inf:qwen-14b",
        "--tenants", "a,b,c", "--json",
    ]  # fmt: skip
    runs = []
    for _ in range(rounds):
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the trace replay failed ({child.returncode})")
        runs.append(json.loads(out))
    walls = [sim["wall_s"] for sim in runs]
    speeds = [sim["simulated_s"] / sim["wall_s"] for sim in runs]
    per_second = [sim["jobs_submitted"] / sim["wall_s"] for sim in runs]
    sim = runs[0]
    cycles_per_request = sim["cycles"] / max(1, sim["jobs_submitted"])
    report.figures.append(
        Figure("Azure LLM code trace 2023 (CC-BY-4.0), 8,819 requests, replayed in full",
               statistics.median(walls), max(walls), unit="s",
               ratio=f"{statistics.median(speeds):.0f}x faster than real time "
               f"(rounds {min(speeds):.0f}x to {max(speeds):.0f}x)",
               target=">= 200x real time", met=statistics.median(speeds) >= 200,
               note=f"{sim['jobs_completed']} completed, {sim['cycles']} cycles "
               f"({cycles_per_request:.2f} per request), platform scheduler in its sandbox, "
               f"default cluster (2 pools x 4 batched workers of 16 slots); TTFT p99 "
               f"{sim['ttft_ms']['all']['p99'] / 1000:.1f} s. {rounds} rounds, each "
               "`scheduler simulate --json` in its own process; 'p99' is the slowest "
               "round. Trace: Microsoft AzurePublicDataset")
    )  # fmt: skip
    report.figures.append(
        Figure("requests simulated per wall second (the same replays)",
               statistics.median(per_second), min(per_second), unit="req/s",
               note=f"median of {rounds} rounds; 'p99' is the slowest round")
    )  # fmt: skip


def service_config(directory: Path, name: str, **overrides: Any) -> ServiceConfig:
    """The embedded default config for a service measured here: state in
    directory/name, free loopback ports, errors only in the log, and `overrides`
    (`local_pool` merged into the default's, the rest replacing whole keys)."""
    data = yaml.safe_load(
        resources.files("orchestrator.config").joinpath("default_config.yaml").read_text()
    )
    data["local_pool"].update(overrides.pop("local_pool", {}))
    data.update(
        state_dir=str(directory / name), log_level="error",
        listen={"grpc": "127.0.0.1:0", "http": "127.0.0.1:0"}, **overrides,
    )  # fmt: skip
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


async def submit_to_dispatch(report: Report, probes: int, backlog: int = 1000) -> None:
    """Submit to dispatch through a real service while `backlog` jobs stay queued: a
    tenant capped at one concurrent job keeps them waiting, every cycle sees them all,
    and probe jobs of another tenant find an idle worker. Timed by the client, from the
    Submit call to the DISPATCHED event on a Watch of every job."""
    from orchestrator._proto import orchestrator_pb2 as pb  # noqa: PLC0415
    from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc  # noqa: PLC0415
    from orchestrator.api.server import Server  # noqa: PLC0415

    token = new_token()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        server = Server(service_config(
            Path(tmp), "state", deployment_mode="platform",
            tenants={"backlog": {"quota_max_concurrent_jobs": 1}, "probe": {}},
            auth={"keys": [{"name": "bench", "role": "operator", "sha256": token_hash(token)}]},
            local_pool={"worker": {"tokens_per_sec": 1000}},
        ))  # fmt: skip
        await server.start()
        dispatched: dict[str, float] = {}
        arrived = asyncio.Event()
        try:
            address = f"127.0.0.1:{server.grpc_port}"
            async with open_channel(address, ClientAuth(token=token)) as channel:
                jobs = pb_grpc.JobServiceStub(channel)
                watch = jobs.Watch(pb.WatchRequest())

                async def follow() -> None:
                    async for event in watch:
                        if event.state == pb.JOB_STATE_DISPATCHED:
                            dispatched.setdefault(event.job_id, time.perf_counter())
                            arrived.set()

                follower = asyncio.create_task(follow())

                async def probe() -> float:
                    started = time.perf_counter()
                    job = await jobs.Submit(pb.SubmitRequest(
                        model="llama-8b", prompt="probe", max_tokens=1, tenant_id="probe",
                        priority="interactive"))  # fmt: skip
                    while job.id not in dispatched:
                        arrived.clear()
                        await asyncio.wait_for(arrived.wait(), 30)
                    return (dispatched[job.id] - started) * 1000

                await probe()  # the first starts the inference workers
                depth, submitted = 0, 0
                while depth < backlog:  # top up: the quota lets a few start as usage lags
                    for _ in range(backlog - depth):
                        submitted += 1
                        await jobs.Submit(pb.SubmitRequest(
                            model="llama-8b", prompt=f"b{submitted}", max_tokens=32_000,
                            tenant_id="backlog", priority="batch"))  # fmt: skip
                    await asyncio.sleep(1)
                    listed = await jobs.List(
                        pb.ListJobsRequest(states=[pb.JOB_STATE_QUEUED], limit=backlog)
                    )
                    depth = len(listed.jobs)
                for _ in range(10):
                    await probe()
                times = [await probe() for _ in range(probes)]
                follower.cancel()
        finally:
            await server.stop()
    m, p = summary(times)
    report.figures.append(
        Figure(f"Submit to dispatch, real service, {depth:,} jobs queued", m, p,
               note=f"{probes} interactive probes of another tenant, one at a time, through "
               "gRPC Submit and Watch; platform mode, platform scheduler")
    )  # fmt: skip


async def tls_and_auth_cost(report: Report, rounds: int, per_round: int) -> None:
    """What TLS and an API key add to a call: two services side by side, one on plain
    loopback without keys, one with TLS and keys, called in alternating order, round
    after round. Submit commits to SQLite (durability full); Get touches no disk and
    shows the per-call cost alone. No pool: the jobs stay queued."""
    from orchestrator._proto import orchestrator_pb2 as pb  # noqa: PLC0415
    from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc  # noqa: PLC0415
    from orchestrator.api.server import Server  # noqa: PLC0415
    from orchestrator.cli.certs import make_pki  # noqa: PLC0415

    token = new_token()
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        servers = []
        secured = {
            "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
            "auth": {"keys": [{"name": "bench", "role": "tenant", "tenant": "t",
                               "sha256": token_hash(token)}]},
        }  # fmt: skip
        for name, secure in (("plain", False), ("tls", True)):
            extra = secured if secure else {}
            server = Server(service_config(Path(tmp), name, local_pool={"enabled": False}, **extra))
            await server.start()
            servers.append(server)
        auths = (ClientAuth(), ClientAuth(token=token, tls_ca=pki.ca.read_bytes()))
        channels = [open_channel(f"127.0.0.1:{srv.grpc_port}", a)
                    for srv, a in zip(servers, auths, strict=True)]  # fmt: skip
        times: dict[tuple[str, int], list[float]] = {}
        by_round: dict[tuple[str, int], list[float]] = {}
        try:
            stubs = [pb_grpc.JobServiceStub(c) for c in channels]
            job_ids = []
            for stub in stubs:  # warm: connections, handshakes, the store
                job = await stub.Submit(pb.SubmitRequest(model="llama-8b", prompt="w",
                                                         max_tokens=1))  # fmt: skip
                job_ids.append(job.id)
            for r in range(rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                for which in order:
                    stub, job_id = stubs[which], job_ids[which]

                    async def submit(stub: Any = stub) -> None:
                        await stub.Submit(pb.SubmitRequest(model="llama-8b", prompt="p",
                                                           max_tokens=1))  # fmt: skip

                    async def get(stub: Any = stub, job_id: str = job_id) -> None:
                        await stub.Get(pb.GetJobRequest(job_id=job_id))

                    for call, fn in (("Submit", submit), ("Get", get)):
                        values = await timed(fn, per_round)
                        times.setdefault((call, which), []).extend(values)
                        by_round.setdefault((call, which), []).append(statistics.median(values))
        finally:
            for channel in channels:
                await channel.close()
            for server in servers:
                await server.stop()
    for call in ("Submit", "Get"):
        (pm, pp), (tm, tp) = summary(times[(call, 0)]), summary(times[(call, 1)])
        ratios = [t / p for p, t in zip(by_round[(call, 0)], by_round[(call, 1)], strict=True)]
        what = "commits to SQLite" if call == "Submit" else "no disk write"
        report.figures += [
            Figure(f"{call} over TLS with an API key ({what})", tm, tp,
                   ratio=f"{tm / pm:.2f}x plain loopback (per round {min(ratios):.2f}x to "
                   f"{max(ratios):.2f}x)",
                   note=f"{tm - pm:+.2f} ms median, {tp - pp:+.2f} ms p99 against plain "
                   f"loopback; {rounds} rounds x {per_round} calls, the two services called "
                   "in alternating order; the spread is of the per-round median ratios"),
            Figure(f"  {call} on plain loopback, no key", pm, pp),
        ]  # fmt: skip


async def _wait_for_workers(server: Any, count: int, timeout_s: float = 60.0) -> list[Any]:
    """The local pool's workers once `count` of them are ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = [p for _, p in server.orchestrator.cluster.processes() if p.status == "ready"]
        if len(ready) >= count:
            return ready
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{count} inference workers were not ready within {timeout_s:.0f} s")


def _slot_service(directory: Path, name: str, slots: int, api: str = "llamacpp") -> ServiceConfig:
    """Two development workers, each alone on a declared GPU that holds one of them,
    so the worker count is the same whatever the slots: only batching differs."""
    gpu = {"device_name": "Bench GPU", "vram_total_bytes": 8 * 1024**3, "compute_capability": "8.9"}
    return service_config(
        directory, name,
        local_pool={"gpus": [{"id": 0, **gpu}, {"id": 1, **gpu}],
                    "worker": {"tokens_per_sec": 200, "slots": slots, "api": api}},
    )  # fmt: skip


async def slots_throughput(report: Report, rounds: int, burst: int, max_tokens: int) -> None:
    """Jobs per second through the real service, development workers with 8 slots
    against 1 slot, same hardware: each round submits `burst` jobs at once to each
    service in turn (alternating which goes first) and times Submit of the first to
    the completion of the last, seen on a Watch."""
    from orchestrator._proto import orchestrator_pb2 as pb  # noqa: PLC0415
    from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc  # noqa: PLC0415
    from orchestrator.api.server import Server  # noqa: PLC0415

    rates: dict[int, list[float]] = {8: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="bench-slots-") as tmp:
        servers = {s: Server(_slot_service(Path(tmp), f"slots{s}", s)) for s in rates}
        for server in servers.values():
            await server.start()
        try:
            for server in servers.values():  # a backlog makes the scheduler start both
                async with open_channel(f"127.0.0.1:{server.grpc_port}", ClientAuth()) as ch:
                    stub = pb_grpc.JobServiceStub(ch)
                    for i in range(32):
                        await stub.Submit(pb.SubmitRequest(
                            model="llama-8b", prompt=f"warm {i}", max_tokens=1))  # fmt: skip
                await _wait_for_workers(server, 2)

            async def one_burst(server: Any) -> float:
                address = f"127.0.0.1:{server.grpc_port}"
                async with open_channel(address, ClientAuth()) as channel:
                    jobs = pb_grpc.JobServiceStub(channel)
                    watch = jobs.Watch(pb.WatchRequest())
                    completed: set[str] = set()
                    progressed = asyncio.Event()

                    async def follow() -> None:  # read as events come: a Watch is bounded
                        async for event in watch:
                            if event.state == pb.JOB_STATE_COMPLETED:
                                completed.add(event.job_id)
                                progressed.set()

                    follower = asyncio.create_task(follow())
                    await asyncio.sleep(0.05)  # the Watch is open before the first submit
                    started = time.perf_counter()
                    submitted = await asyncio.gather(*(
                        jobs.Submit(pb.SubmitRequest(
                            model="llama-8b", prompt=f"burst {i}", max_tokens=max_tokens))
                        for i in range(burst)
                    ))  # fmt: skip
                    ids = {job.id for job in submitted}
                    while not ids <= completed:
                        progressed.clear()
                        await asyncio.wait_for(progressed.wait(), 60)
                    elapsed = time.perf_counter() - started
                    follower.cancel()
                    return burst / elapsed

            for r in range(rounds):
                order = (8, 1) if r % 2 == 0 else (1, 8)
                for slots in order:
                    rates[slots].append(await one_burst(servers[slots]))
        finally:
            for server in servers.values():
                await server.stop()
    ratios = [a / b for a, b in zip(rates[8], rates[1], strict=True)]
    for slots, measured in rates.items():
        m, low = statistics.median(measured), min(measured)
        report.figures.append(
            Figure(f"{'' if slots == 8 else '  '}jobs per second, 2 development workers, "
                   f"{slots} slot{'s' if slots > 1 else ''} each", m, low, unit="/s",
                   ratio=(f"{statistics.median(ratios):.2f}x 1 slot (per round "
                          f"{min(ratios):.2f}x to {max(ratios):.2f}x)") if slots == 8 else "",
                   note=(f"{rounds} rounds of {burst} jobs of {max_tokens} tokens submitted at "
                         "once, the two services in alternating order; the p99 column is the "
                         "slowest round; workers at 200 tokens/s for one sequence")
                   if slots == 8 else ""),
        )  # fmt: skip


async def _first_content_ms(
    session: Any, url: str, body: dict[str, Any], headers: dict[str, str]
) -> float:
    """Time from the request to the first chunk that carries text, streamed."""
    import json  # noqa: PLC0415

    started = time.perf_counter()
    first = None
    async with session.post(url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if first is None and line.startswith(b"data:") and line != b"data: [DONE]":
                choice = json.loads(line[5:])["choices"]
                if choice and choice[0].get("delta", {}).get("content"):
                    first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError(f"{url} streamed no text")
    return first


async def front_door_ttft(report: Report, count: int) -> None:
    """Time to first token through the core's OpenAI front door against the same
    request sent straight to the development worker, alternately: the difference is
    what the core adds (parse, durable submit, a scheduling cycle in the sandbox,
    dispatch, relaying the stream)."""
    import aiohttp  # noqa: PLC0415

    from orchestrator.api.server import Server  # noqa: PLC0415

    body: dict[str, Any] = {
        "model": "llama-8b", "max_tokens": 4, "stream": True,
        "messages": [{"role": "user", "content": "Say something about schedulers. " * 8}],
    }  # fmt: skip
    times: dict[str, list[float]] = {"core": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        server = Server(_slot_service(Path(tmp), "ttft", 8, api="openai"))
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                core = f"http://127.0.0.1:{server.http_port}/v1/chat/completions"
                await _first_content_ms(session, core, body, {})  # starts a worker
                (worker, *_) = await _wait_for_workers(server, 1)
                direct = f"{worker.uri}/v1/chat/completions"
                # The worker serves the catalog's model_ref, the name the core sends it.
                direct_body = {**body, "model": worker.model_ref}
                for i in range(count):
                    order = ("core", "direct") if i % 2 == 0 else ("direct", "core")
                    for which in order:
                        if which == "core":
                            ms = await _first_content_ms(session, core, body, {})
                        else:
                            ms = await _first_content_ms(session, direct, direct_body, {})
                        times[which].append(ms)
        finally:
            await server.stop()
    (cm, cp), (dm, dp) = summary(times["core"]), summary(times["direct"])
    report.figures += [
        Figure("TTFT through the OpenAI front door (streamed chat)", cm, cp,
               ratio=f"+{cm - dm:.2f} ms median, +{cp - dp:.2f} ms p99 over direct",
               note=f"{count} requests each way, one at a time, alternating; a development "
               "worker in the openai dialect with 8 slots; the core's part is a durable "
               "submit, a scheduling cycle (platform scheduler in its sandbox), the dispatch "
               "commit and relaying the stream"),
        Figure("  TTFT straight to the worker", dm, dp),
    ]  # fmt: skip


def in_process_floor(n_jobs: int, count: int, churn_jobs: int | None = None,
                     script: str = ENTRY_POINT) -> tuple[float, float]:  # fmt: skip
    """9. The same cycles in-process: the context from the logged changes, the delta,
    lupa applying it and the script, with no process, no gRPC and no validation."""
    runtime = LuaSchedulerRuntime(sandbox_pb2.LANGUAGE_LUAJIT)
    runtime.load(
        sandbox_pb2.LoadRequest(
            name="entry.lua", source=script, limits=_limits_for(n_jobs).to_proto(),
            platform_source=platform_source(), expose_platform_source=True,
        )
    )  # fmt: skip
    jobs = max(1, n_jobs // 100) if churn_jobs is None else churn_jobs
    driven = ChurnedCluster(n_jobs, 1024)
    journal = SnapshotJournal()
    journal.advance(driven.ctx)
    runtime.apply_snapshot(journal.full_snapshot())
    times = []
    for step in range(count):
        driven.events(step, jobs, 10)
        started = time.perf_counter()
        journal.advance(driven.context())
        for delta in journal.request_for(journal.epoch, journal.seq - 1).deltas:
            runtime.apply_delta(delta)
        runtime.run(False, False)
        times.append((time.perf_counter() - started) * 1000)
    return summary(times)


def bare_lupa(count: int) -> tuple[float, float]:
    """A lupa call into a trivial Lua function: the price of crossing into Lua at all."""
    lua = lupa.luajit21.LuaRuntime()
    fn = lua.eval("function(x) return x end")
    times = []
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1000)
    return summary(times)


class Stages:
    """Between stages: say what comes next (on stderr: the report goes to stdout), and
    collect what the last stage left, so it is not billed to the next."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, stage: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"bench [{elapsed:4.0f} s] {stage}", file=sys.stderr, flush=True)
        gc.collect()
        gc.freeze()


async def run(quick: bool = False) -> Report:
    settle = Stages()
    report = Report()
    settle("1. decision round trip against a bare gRPC echo")
    n = 200 if quick else 1000
    await decision_vs_echo(report, n)
    big_jobs, cycles = (10_000, 40) if quick else (10_000, 300)
    settle("2, 3. delta cycles and full resyncs at 10,000 jobs")
    deltas, fulls = await cycle_cost(big_jobs, 1024, cycles)
    (dm, dp), (fm, fp) = summary(deltas), summary(fulls)
    chunks = [deltas[i::5] for i in range(5)]  # interleaved: each round sees the whole run
    report.figures.append(
        Figure("cycle, 10,000 jobs / 1,024 workers, 1% churn (delta)", dm, dp,
               ratio=f"{fm / dm:.0f}x cheaper than a full snapshot; p99 of 5 rounds "
               f"{spread([pct(c, 0.99) for c in chunks], ' ms')}", target="p99 <= 5 ms",
               met=dp <= 5,
               note="runtime-spec 2 entry-point script; the context is built from the "
               "changes the queue logged (100 jobs replaced, 10 workers changed a cycle)")
    )  # fmt: skip
    report.figures.append(
        Figure("full resync, 10,000 jobs / 1,024 workers", fm, fp, target="<= 50 ms",
               met=fm <= 50, ratio=f"{len(fulls)} resyncs {spread(fulls, ' ms')}",
               note="snapshot built, sent, applied, then the script runs")
    )  # fmt: skip
    if quick:
        return report
    settle("4. runaway script to fallback")
    await runaway(report)
    settle("5. worker crash to a spare's decision")
    await crash_to_spare(report)
    settle("what hedging costs in CPU")
    await hedge_cost(report)
    settle("requests per second through the whole service")
    await service(report)
    settle("worker spawn: fork server against exec")
    await spawn_cost(report, 30)
    settle("6, 8. decisions per second and RSS per worker")
    rate = await throughput_and_rss(report, 2000)
    settle("simulated decisions per second at 10,000 jobs")
    await simulated(report, 2000, rate)
    settle("the Azure code trace, replayed in full")
    await trace_replay(report, rounds=3)
    settle("Submit to dispatch at 1,000 queued jobs, real service")
    await submit_to_dispatch(report, 300)
    settle("what TLS and an API key add to a call")
    await tls_and_auth_cost(report, rounds=6, per_round=200)
    settle("jobs per second: development workers with 8 slots against 1")
    await slots_throughput(report, rounds=5, burst=64, max_tokens=16)
    settle("TTFT through the OpenAI front door against direct to the worker")
    await front_door_ttft(report, 200)
    settle("9. the in-process floor")
    fm_, fp_ = in_process_floor(10_000, 300)
    report.figures.append(
        Figure("floor: same deltas and script in-process (no isolation)", fm_, fp_,
               ratio=f"sandbox pays {dm / fm_:.2f}x (median)",
               note="journal diff + lupa apply + run, no process, no gRPC")
    )  # fmt: skip
    lm, lp = bare_lupa(10_000)
    report.figures.append(Figure("floor: one lupa call into Lua", lm * 1000, lp * 1000, unit="µs"))
    for language in ("luajit", "lua54"):
        settle(f"7. {language}: delta and full at 10,000 jobs")
        d, f = await cycle_cost(10_000, 1024, 100, language)
        report.runtimes.append((language, "delta cycle, 10k jobs", *summary(d)))
        report.runtimes.append((language, "full resync, 10k jobs", *summary(f)))
    for language in ("luajit", "lua54"):
        base = sample_context()
        settle(f"7. {language}: platform scheduler, sample context")
        async with engine(None, language=language) as eng:
            times = []
            for i in range(500):
                result = await eng.schedule(dataclasses.replace(base, now_ms=base.now_ms + i))
                times.append(result.latency_ms)
        report.runtimes.append((language, "platform scheduler, sample context", *summary(times)))
    for jobs in GROWTH_SIZES:
        settle(f"growth: {jobs:,} queued jobs, {GROWTH_CHURN} replaced per cycle")
        count = 60 if jobs >= 1_000_000 else 150
        d, f = await cycle_cost(jobs, 1024, count, churn_jobs=GROWTH_CHURN, script=QUEUE_BLIND)
        e, _ = await cycle_cost(jobs, 1024, count, churn_jobs=GROWTH_CHURN)
        floor = in_process_floor(jobs, count, churn_jobs=GROWTH_CHURN, script=QUEUE_BLIND)
        report.growth.append(
            Growth(jobs, *summary(d), statistics.median(e), floor[0], statistics.median(f))
        )
    return report


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lua = lupa.luajit21.LuaRuntime().eval("jit.version")
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}; {lua}"
    )


def render(report: Report) -> str:
    def fmt(value: float, unit: str) -> str:
        return f"{value:,.0f} {unit}" if unit == "/s" else f"{value:.2f} {unit}"

    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`orchestratord bench`). Every figure below was measured "
        "in the same run, on:",
        "",
        f"- **Machine**: {machine()}",
        f"- **Date**: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "| figure | median | p99 | side by side | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in report.figures:
        met = "" if f.met is None else ("yes" if f.met else "**no**")
        lines.append(
            f"| {f.name} | {fmt(f.median, f.unit)} | {fmt(f.p99, f.unit)} | {f.ratio} "
            f"| {f.target} | {met} |"
        )
    lines += ["", "Notes:"]
    lines += [f"- {f.name.strip()}: {f.note}" for f in report.figures if f.note]
    lines += [
        "",
        "## LuaJIT against Lua 5.4",
        "",
        "| runtime | case | median | p99 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r} | {case} | {m:.2f} ms | {p:.2f} ms |" for r, case, m, p in report.runtimes]
    lines += [
        "",
        "## How the cycle grows with the queue",
        "",
        f"1,024 workers; per cycle {GROWTH_CHURN} jobs replaced (the same number at every "
        "size) and 10 workers changed; the whole engine cycle from the logged changes, in "
        "the sandbox. The first columns run a script that reads no job (`ctx.metrics` "
        "only): what a cycle costs besides the script's own work, the figure the target "
        "is about. The entry point of runtime-spec section 2 reads `ctx.queue[1]`, and "
        "reading `ctx.queue` makes the sandbox merge the queue and copy it for the script "
        "(sandbox_worker/lua/README.md): that part grows with the queue, and is the "
        "script's.",
        "",
        "| queued jobs | delta cycle median | delta cycle p99 | median against 1,000 jobs "
        "| entry point, median | in-process floor median | full resync median |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = report.growth[0].median if report.growth else 0.0
    lines += [
        f"| {g.jobs:,} | {g.median:.2f} ms | {g.p99:.2f} ms | {g.median / base:.2f}x "
        f"| {g.entry_point:.2f} ms | {g.floor:.2f} ms | {g.full:.1f} ms |"
        for g in report.growth
    ]
    return "\n".join(lines) + "\n"


def main(output: Path, quick: bool) -> int:
    report = asyncio.run(run(quick))
    text = render(report)
    output.write_text(text)
    print(text)
    return 0
