"""Requests per second through the whole service (issue 17, item 5).

`service_throughput` starts a real service in this process (the orchestrator, its
sandboxed platform scheduler, two development workers of 64 slots as subprocesses)
and drives it from a load generator in a process of its own: a bounded number of
clients, each sending one request and waiting for it to complete before sending the
next. In `grpc` a request is a Submit, then a StreamOutput of the job, whose last
chunk carries the job as it ended; in `openai` it is a chat completion through the
official `openai` client. Outputs are one token, so what is measured is the service,
not the generation. Every job is durable as in production (SQLite, synchronous=FULL),
and afterwards every job a client was told of is looked up in the store: each must
have completed.

Figures: requests per second over a window of rounds (each round's rate, the spread
over rounds); the client's latency; the scheduling overhead, submit to dispatch as
the job records have it; the engine's cycle latency and dispatches per cycle at that
rate; the CPU each process used, and the orchestrator's per request; where the
orchestrator's event loop spent its time (`Sampler`).

`orchestrator/cli/bench.py` imports this module and this module imports nothing of
it (the import contract forbids a cycle), so it returns plain numbers, and
`ServiceThroughput.figures()` gives `bench.Figure` keyword arguments.

    python -m orchestrator.cli.bench_service --api grpc --rounds 5 --round-s 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from orchestrator.config.credentials import new_token, token_hash
from orchestrator.config.settings import ServiceConfig, load_config
from orchestrator.domain import decision as decisions
from orchestrator.domain.jobs import SubmitSpec
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.support.clock import now_ms
from orchestrator.support.log import configure_logging

APIS = {"grpc": "gRPC Submit + StreamOutput", "openai": "OpenAI chat completions"}
SLOTS = 64  # per development worker; two workers
WORKER_TOKENS_PER_S = 2000  # one sequence alone: a one-token job is a step of the batch
# The load generator's callers, each with an API key and a connection of its own: a
# caller may hold 64 streams at once (WATCHES_PER_CALLER, api/rpc/jobs.py).
CALLERS = 4
TOKENS_ENV = "BENCH_SERVICE_TOKENS"  # the callers' keys, for the load generator
SETTLE_S = 60.0  # after the load, for the last jobs to end
RESULT_BYTES = 64 * 2**20  # the load generator's last line: every job id it was given
SAMPLE_S = 0.002  # the sampler's period
TARGET_PER_S = 500
GOAL_PER_S = 1000
MAIN_THREAD = "event loop (main)"


# ---------------------------------------------------------------- the result
@dataclass
class ServiceThroughput:
    api: str
    concurrency: int
    round_s: float
    rates: list[float]  # completed requests per second, each round
    completed: int  # in the window
    requests: int  # every request the clients sent, warm-up and the last ones included
    failed: int  # of those, requests that got an error
    unfinished: int  # jobs a client was told of that did not complete (must be 0)
    latency_ms: tuple[float, float]  # the client's, request to completion: p50, p99
    overhead_ms: tuple[float, float]  # submit to dispatch, from the job records
    cycle_ms: tuple[float, float]  # the engine's decision latency
    cycle_count: int
    dispatches_per_cycle: float
    cpu_cores: dict[str, float]  # CPU used per group of processes over the window
    stages: list[tuple[str, float]]  # where the event loop was: share of its time
    hot: list[tuple[str, float]]  # the functions it was in: share of its busy time
    threads: dict[str, float]  # CPU of each thread of the orchestrator, in cores
    loop_waited: float | None  # share of the window its event loop waited for a CPU

    @property
    def rate(self) -> float:
        return self.completed / (self.round_s * len(self.rates))

    def cpu_ms(self, cores: float) -> float:
        """CPU per completed request, in ms, of what used `cores` over the window."""
        return cores / self.rate * 1000 if self.rate else 0.0

    def figures(self) -> list[dict[str, Any]]:
        """`bench.Figure` keyword arguments: name, median, p99, unit, ratio, target,
        met, note."""
        cpu = ", ".join(f"{name} {cores:.2f}" for name, cores in self.cpu_cores.items())
        threads = ", ".join(f"{name} {cores:.2f}" for name, cores in self.threads.items())
        stages = ", ".join(f"{name} {share:.0%}" for name, share in self.stages[:10])
        hot = ", ".join(f"{name} {share:.0%}" for name, share in self.hot[:6])
        orchestrator = self.cpu_ms(self.cpu_cores.get("orchestrator", 0.0))
        loop = self.cpu_ms(self.threads.get(MAIN_THREAD, 0.0))
        waited = (
            ""
            if self.loop_waited is None
            else f"; the event loop was ready but waited for a CPU {self.loop_waited:.0%} "
            "of the window (the cores were busy elsewhere)"
        )
        return [
            {
                "name": f"requests per second, whole service, {APIS[self.api]}",
                "median": self.rate,
                "p99": min(self.rates),
                "unit": "/s",
                "ratio": f"rounds {min(self.rates):,.0f} to {max(self.rates):,.0f}/s",
                "target": f">= {TARGET_PER_S}/s (goal {GOAL_PER_S:,})",
                "met": self.rate >= TARGET_PER_S,
                "note": (
                    f"{self.concurrency} clients in a process of their own, one request "
                    f"in flight each, one-token outputs, 2 development workers of {SLOTS} "
                    f"slots, the platform scheduler in its sandbox, every job durable; "
                    f"{len(self.rates)} rounds of {self.round_s:.0f} s after a warm-up: "
                    "the median column is the rate over all of them, the p99 column the "
                    f"slowest round's. {self.requests:,} requests, {self.failed} failed, "
                    f"{self.unfinished} jobs not completed in the store. CPU used, in "
                    f"cores: {cpu}"
                ),
            },
            {
                "name": f"  request to completion at that rate ({self.api})",
                "median": self.latency_ms[0],
                "p99": self.latency_ms[1],
                "note": "as the client times it",
            },
            {
                "name": f"  scheduling overhead at that rate ({self.api})",
                "median": self.overhead_ms[0],
                "p99": self.overhead_ms[1],
                "note": (
                    "submit to dispatch as the job records have it (created_at to "
                    "dispatched_at, a millisecond clock): the durable insert, the wait "
                    "for a cycle, the cycle"
                ),
            },
            {
                "name": f"  engine cycle at that rate ({self.api})",
                "median": self.cycle_ms[0],
                "p99": self.cycle_ms[1],
                "note": (
                    f"{self.cycle_count:,} cycles in the window, "
                    f"{self.dispatches_per_cycle:.1f} dispatches each"
                ),
            },
            {
                "name": f"  orchestrator CPU per request ({self.api})",
                "median": orchestrator,
                "p99": orchestrator,
                "ratio": f"of which its event loop {loop:.2f} ms",
                "note": (
                    f"the orchestrator process's CPU over the window per request; by "
                    f"thread, in cores: {threads}{waited}. Where its event loop was (sampled): "
                    f"{stages}; the functions it was in: {hot}"
                ),
            },
        ]


# ---------------------------------------------------------------- CPU per process
def _process_cpu(load_pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and of every process it started, each with
    its group."""
    me = os.getpid()
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    out: dict[int, tuple[str, float]] = {}
    for pid, seconds in used.items():
        ancestor = pid
        while ancestor not in (me, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == me:
            out[pid] = (_group(pid, me, load_pid), seconds)
    return out


def _group(pid: int, me: int, load_pid: int) -> str:
    if pid == me:
        return "orchestrator"
    if pid == load_pid:
        return "load generator"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    if b"devworker" in command:
        return "development workers"
    if b"sandbox_worker" in command:
        return "sandbox workers"
    return "other"


def _cpu_used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], elapsed_s: float
) -> dict[str, float]:
    """Cores used by each group between two readings, most first."""
    used: defaultdict[str, float] = defaultdict(float)
    for pid, (group, seconds) in after.items():
        used[group] += (seconds - before.get(pid, (group, 0.0))[1]) / elapsed_s
    return _by_size(used)


def _by_size(values: dict[str, float]) -> dict[str, float]:
    return dict(sorted(values.items(), key=lambda item: -item[1]))


# ---------------------------------------------------------------- where the time goes
# Stages of the orchestrator's event loop, by the qualified names of the frames on its
# stack: a sample is billed to the innermost frame that names one. Cython (grpc.aio)
# and C code have no Python frames: a sample in it is billed to the Python frame that
# called it, and one whose innermost frame is the event loop's own callback runner
# (`Handle._run`) is C code the loop called: gRPC's, mostly.
STAGES = {
    "JobServicer.Submit": "gRPC Submit",
    "JobServicer.StreamOutput": "gRPC StreamOutput",
    "Orchestrator.stream_output": "gRPC StreamOutput",
    "AuthInterceptor.intercept_service": "gRPC auth",
    "AuthInterceptor._admit": "gRPC auth",
    "_complete": "OpenAI front door",
    "RequestHandler._handle_request": "HTTP server (aiohttp)",
    "RequestHandler.start": "HTTP server (aiohttp)",
    "Jobs.submit": "submit (validate, admit, enqueue)",
    "AsyncJobStore._commit_queued": "store: statements",
    "SchedulingLoop.cycle": "cycle: other",
    "ClusterState.context": "cycle: context",
    "SchedulingEngine.schedule": "cycle: engine (journal, sandbox call, validation)",
    "DecisionLog.record": "cycle: decision log",
    "DecisionApplier.apply": "cycle: apply",
    "Jobs.dispatch": "cycle: dispatch transitions",
    "ServiceMetrics.update_gauges": "cycle: gauges",
    "JobRunner._run": "running jobs: worker HTTP client",
    "Jobs._running": "transitions: first token",
    "Jobs.complete": "transitions: complete",
    "_SelectorSocketTransport._read_ready": "sockets: read",
    "_SelectorSocketTransport.write": "sockets: write",
    "Handle._run": "C code under the loop (gRPC core, asyncio)",
}
IDLE = "idle (waiting for I/O)"
OTHER = "event loop and other"


@dataclass
class _Samples:
    stages: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    functions: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    threads: dict[str, float] = field(default_factory=dict)  # thread name -> cores
    waited: float | None = None  # share of the time the event loop was ready, not running

    def shares(self) -> list[tuple[str, float]]:
        """Each stage's share of the event loop's time, most first."""
        return _shares(self.stages)

    def hot(self) -> list[tuple[str, float]]:
        """The functions the event loop was in when not idle, by share of that time."""
        return _shares(self.functions)[:12]


def _shares(seconds: dict[str, float]) -> list[tuple[str, float]]:
    total = sum(seconds.values()) or 1.0
    return [(name, s / total) for name, s in _by_size(seconds).items()]


class Sampler:
    """A sampling profiler of this process's event loop (its main thread), by wall
    time: SIGALRM every SAMPLE_S, whose handler runs in the main thread and reads its
    stack. It takes no GIL from the loop (a sampling thread would, at every point where
    the loop releases it, and then be found there). A sample weighs the time since the
    one before: signals that arrive while the thread waits for the GIL are handled
    together when it has it back, where it waited. With it, the CPU each thread of the
    process used (/proc/self/task): the store's commits and gRPC's own threads."""

    def __init__(self) -> None:
        self._samples = _Samples()
        self._last = 0.0
        self._started = 0.0
        self._cpu: dict[str, float] = {}
        self._waited: float | None = None
        self._running = False

    def start(self) -> None:
        self._cpu = _thread_cpu()
        self._waited = _runqueue_s()
        self._started = self._last = time.perf_counter()
        self._running = True
        signal.signal(signal.SIGALRM, self._sample)
        signal.setitimer(signal.ITIMER_REAL, SAMPLE_S, SAMPLE_S)

    def stop(self) -> _Samples:
        if self._running:
            self._running = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            elapsed = time.perf_counter() - self._started
            used = {name: s - self._cpu.get(name, 0.0) for name, s in _thread_cpu().items()}
            self._samples.threads = _by_size({n: s / elapsed for n, s in used.items() if s > 0})
            waited = _runqueue_s()
            if waited is not None and self._waited is not None:
                self._samples.waited = (waited - self._waited) / elapsed
        return self._samples

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        now = time.perf_counter()
        weight, self._last = now - self._last, now
        if frame is None:
            return
        code = frame.f_code
        if code.co_name in ("select", "poll") and code.co_filename.endswith("selectors.py"):
            self._samples.stages[IDLE] += weight
            return
        self._samples.functions[f"{Path(code.co_filename).name}:{code.co_qualname}"] += weight
        inner: FrameType | None = frame
        while inner is not None:
            stage = STAGES.get(inner.f_code.co_qualname)
            if stage is not None:
                self._samples.stages[stage] += weight
                return
            inner = inner.f_back
        self._samples.stages[OTHER] += weight


def _runqueue_s() -> float | None:
    """How long the main thread has waited for a CPU while ready to run, in seconds
    (/proc schedstat); None where the kernel does not keep it."""
    try:
        fields = Path(f"/proc/self/task/{threading.main_thread().native_id}/schedstat")
        return int(fields.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by name (ThreadPoolExecutor's
    names do not reach the kernel: the store's thread is one of the "python")."""
    tick = os.sysconf("SC_CLK_TCK")
    main = threading.main_thread().native_id
    out: defaultdict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        name = MAIN_THREAD if int(tid) == main else name.rstrip("_0123456789")
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


# ---------------------------------------------------------------- the service side
def throughput_config(directory: Path, tokens: Sequence[str]) -> ServiceConfig:
    """The embedded default config with two development workers of SLOTS slots, each
    alone on a declared GPU, on free loopback ports, logging errors only, and an
    operator's key for each of `tokens`."""
    data = yaml.safe_load(
        resources.files("orchestrator.config").joinpath("default_config.yaml").read_text()
    )
    gpu = {"device_name": "Bench GPU", "vram_total_bytes": 8 * 1024**3, "compute_capability": "8.9"}
    data["local_pool"].update(
        gpus=[{"id": 0, **gpu}, {"id": 1, **gpu}],
        worker={"tokens_per_sec": WORKER_TOKENS_PER_S, "slots": SLOTS},
    )
    keys = [{"name": f"bench-{i}", "role": "operator", "sha256": token_hash(token)}
            for i, token in enumerate(tokens)]  # fmt: skip
    data.update(
        state_dir=str(directory / "state"),
        log_level="error",
        listen={"grpc": "127.0.0.1:0", "http": "127.0.0.1:0"},
        auth={"keys": keys},
    )
    path = directory / "throughput.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


async def service_throughput(
    api: str, *, concurrency: int = 128, rounds: int = 5, round_s: float = 4.0,
    warmup_s: float = 3.0,
) -> ServiceThroughput:  # fmt: skip
    """Drive a real service from the load generator for `warmup_s`, then for `rounds`
    rounds of `round_s`, and measure it (the module's docstring)."""
    from orchestrator.api.server import Server  # noqa: PLC0415 - the edges are above cli

    tokens = [new_token() for _ in range(CALLERS)]
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        server = Server(throughput_config(Path(tmp), tokens))
        await server.start()
        o = server.orchestrator
        cycles: list[CycleResult] = []
        try:
            await _start_workers(o)
            o.loop.on_applied = (*o.loop.on_applied, cycles.append)
            target = (
                f"127.0.0.1:{server.grpc_port}"
                if api == "grpc"
                else f"http://127.0.0.1:{server.http_port}/v1"
            )
            window = await _drive(api, target, tokens, concurrency, rounds, round_s, warmup_s)
            await _settled(o)
        finally:
            await server.stop()
        return _result(api, concurrency, round_s, window, cycles, o.state_dir / "jobs.sqlite3")


async def _start_workers(o: Any) -> None:
    """Both workers started (a backlog makes the platform scheduler start them) and
    ready, their first jobs done: the window measures a warm service."""
    jobs = [
        await o.submit(SubmitSpec(model="llama-8b", prompt=f"warm {i}", max_tokens=1))
        for i in range(32)
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = [p for _, p in o.cluster.processes() if p.status == "ready"]
        done = [await o.get(job.id) for job in jobs]
        if len(ready) >= 2 and all(job.state == "completed" for job in done):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the development workers did not start within 60 s")


async def _settled(o: Any) -> None:
    """No job queued or running: every job a client was told of has ended (a client
    whose stream failed does not wait for its job). The store says how."""
    deadline = time.monotonic() + SETTLE_S
    while o.cluster.queue_depth or o.cluster.in_flight:
        if time.monotonic() > deadline:
            return  # what is left is counted as unfinished
        await asyncio.sleep(0.1)


@dataclass
class _Window:
    """What the load generator reported, and what this process saw meanwhile."""

    load: dict[str, Any]
    started_ms: int = 0
    ended_ms: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    samples: _Samples = field(default_factory=_Samples)


async def _drive(
    api: str, target: str, tokens: Sequence[str], concurrency: int, rounds: int,
    round_s: float, warmup_s: float,
) -> _Window:  # fmt: skip
    """The load generator, in a process of its own. It says when the measured window
    starts and when it ends: the CPU counters and the sampler follow it."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli.bench_service", "load", "--api", api,
        "--target", target, "--concurrency", str(concurrency), "--rounds", str(rounds),
        "--round-s", str(round_s), "--warmup-s", str(warmup_s),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, TOKENS_ENV: ",".join(tokens)},
        limit=RESULT_BYTES,
    )  # fmt: skip
    assert child.stdout is not None
    window = _Window(load={})
    sampler = Sampler()
    cpu_before: dict[int, tuple[str, float]] = {}
    started = time.monotonic()
    try:
        async for raw in child.stdout:
            line = json.loads(raw)
            if line["event"] == "start":
                window.started_ms = now_ms()
                cpu_before = _process_cpu(child.pid)
                started = time.monotonic()
                sampler.start()
            elif line["event"] == "end":
                window.samples = sampler.stop()
                elapsed = time.monotonic() - started
                window.ended_ms = now_ms()
                window.cpu = _cpu_used(cpu_before, _process_cpu(child.pid), elapsed)
            elif line["event"] == "result":
                window.load = line
    finally:
        sampler.stop()
        await child.wait()
    if child.returncode != 0 or not window.load:
        raise RuntimeError(f"the load generator failed ({child.returncode})")
    return window


def _result(
    api: str,
    concurrency: int,
    round_s: float,
    window: _Window,
    cycles: list[CycleResult],
    store: Path,
) -> ServiceThroughput:
    load = window.load
    ids = load["job_ids"]
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        (completed,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'completed' AND id IN "
            "(SELECT value FROM json_each(?))", (json.dumps(ids),),
        ).fetchone()  # fmt: skip
        waits = [
            float(wait)
            for (wait,) in db.execute(
                "SELECT dispatched_at - created_at FROM jobs WHERE created_at >= ? AND "
                "created_at < ? AND dispatched_at IS NOT NULL",
                (window.started_ms, window.ended_ms),
            )
        ]
    finally:
        db.close()
    measured = [c for c in cycles if window.started_ms <= c.context.now_ms < window.ended_ms]
    dispatches = sum(
        isinstance(action, decisions.Dispatch)
        for cycle in measured
        for action in decisions.flatten(cycle.decision)
    )
    return ServiceThroughput(
        api=api,
        concurrency=concurrency,
        round_s=round_s,
        rates=[n / round_s for n in load["rounds"]],
        completed=sum(load["rounds"]),
        requests=len(ids) + load["failed"],
        failed=load["failed"],
        unfinished=len(ids) - completed,
        latency_ms=(load["latency_p50_ms"], load["latency_p99_ms"]),
        overhead_ms=p50_p99(waits),
        cycle_ms=p50_p99([c.latency_ms for c in measured]),
        cycle_count=len(measured),
        dispatches_per_cycle=dispatches / max(1, len(measured)),
        cpu_cores=window.cpu,
        stages=window.samples.shares(),
        hot=window.samples.hot(),
        threads=window.samples.threads,
        loop_waited=window.samples.waited,
    )


def p50_p99(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return (0.0, 0.0)
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


# ---------------------------------------------------------------- the load generator
@dataclass
class _Load:
    """What the clients have seen: completions with their times and latencies."""

    done: list[tuple[float, float]] = field(default_factory=list)  # (at, latency), s
    job_ids: list[str] = field(default_factory=list)
    failed: int = 0
    stop: bool = False


async def _grpc_clients(target: str, tokens: Sequence[str], concurrency: int, load: _Load) -> None:
    """Each client submits, then follows its job's output to the job's end, over the
    connection of one of the callers."""
    from orchestrator._proto import orchestrator_pb2 as pb  # noqa: PLC0415
    from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc  # noqa: PLC0415
    from orchestrator.wire.channel import ClientAuth, open_channel  # noqa: PLC0415

    channels = [open_channel(target, ClientAuth(token=token)) for token in tokens]
    stubs = [pb_grpc.JobServiceStub(channel) for channel in channels]

    async def client(index: int) -> None:
        stub = stubs[index % len(stubs)]
        sent = 0
        while not load.stop:
            sent += 1
            started = time.perf_counter()
            request = pb.SubmitRequest(model="llama-8b", prompt=f"c{index} r{sent}", max_tokens=1)
            try:
                job = await stub.Submit(request)
                load.job_ids.append(job.id)
                state = job.state
                async for chunk in stub.StreamOutput(pb.GetJobRequest(job_id=job.id)):
                    if chunk.HasField("job"):
                        state = chunk.job.state
            except Exception:  # counted: a failed request is a figure
                load.failed += 1
                continue
            if state != pb.JOB_STATE_COMPLETED:
                load.failed += 1
                continue
            ended = time.perf_counter()
            load.done.append((ended, ended - started))

    try:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    finally:
        for channel in channels:
            await channel.close()


async def _openai_clients(
    target: str, tokens: Sequence[str], concurrency: int, load: _Load
) -> None:
    """Each client asks for a chat completion and waits for it, through the client of
    one of the callers."""
    import openai  # noqa: PLC0415 - the load generator's alone

    clients = [openai.AsyncOpenAI(base_url=target, api_key=token, max_retries=0, timeout=60)
               for token in tokens]  # fmt: skip

    async def one(index: int) -> None:
        client = clients[index % len(clients)]
        sent = 0
        while not load.stop:
            sent += 1
            started = time.perf_counter()
            try:
                answer = await client.chat.completions.create(
                    model="llama-8b",
                    messages=[{"role": "user", "content": f"c{index} r{sent}"}],
                    max_tokens=1,
                )
            except openai.OpenAIError:
                load.failed += 1
                continue
            load.job_ids.append(answer.id.removeprefix("chatcmpl-"))
            ended = time.perf_counter()
            load.done.append((ended, ended - started))

    try:
        await asyncio.gather(*(one(i) for i in range(concurrency)))
    finally:
        for client in clients:
            await client.close()


async def _generate(args: argparse.Namespace) -> None:
    """The load generator: warm up, say "start", run the rounds, say "end", let every
    request in flight end, and say what the clients saw."""
    load = _Load()
    clients = _grpc_clients if args.api == "grpc" else _openai_clients
    tokens = os.environ[TOKENS_ENV].split(",")
    running = asyncio.create_task(clients(args.target, tokens, args.concurrency, load))
    await asyncio.sleep(args.warmup_s)
    _say(event="start")
    started = time.perf_counter()
    bounds = [started + args.round_s * (i + 1) for i in range(args.rounds)]
    await asyncio.sleep(bounds[-1] - time.perf_counter())
    _say(event="end")
    load.stop = True
    await running
    rounds = [0] * args.rounds
    latencies = []
    for at, latency in load.done:
        if started <= at < bounds[-1]:
            rounds[next(i for i, bound in enumerate(bounds) if at < bound)] += 1
            latencies.append(latency * 1000)
    p50, p99 = p50_p99(latencies)
    _say(event="result", rounds=rounds, failed=load.failed, job_ids=load.job_ids,
         latency_p50_ms=p50, latency_p99_ms=p99)  # fmt: skip


def _say(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- the command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_service", description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=("measure", "load"), default="measure",
                        help="measure (default), or be a measure's load generator")  # fmt: skip
    parser.add_argument("--api", choices=sorted(APIS), default="grpc")
    parser.add_argument("--target", help="load: the gRPC address or the OpenAI base URL")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    configure_logging("console", "error")
    if args.mode == "load":
        asyncio.run(_generate(args))
        return 0
    result = asyncio.run(service_throughput(
        args.api, concurrency=args.concurrency, rounds=args.rounds, round_s=args.round_s,
        warmup_s=args.warmup_s,
    ))  # fmt: skip
    for figure in result.figures():
        print(f"{figure['name']}: {figure['median']:,.2f} (p99 column {figure['p99']:,.2f}) "
              f"{figure.get('ratio', '')}\n    {figure.get('note', '')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
