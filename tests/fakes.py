"""Small fakes at the edges the parts declare (typing.Protocol), for unit tests that
need no server, no sandbox and no inference worker. Each keeps the contract of the
real thing it stands for; the real ones are exercised by the service tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from orchestrator.config.settings import ServiceConfig
from orchestrator.domain.context import Catalog, CatalogModel, Gpu, HostReading, ProcessInfo
from orchestrator.domain.errors import PoolError
from orchestrator.domain.jobs import JobRecord, SubmitSpec, new_record
from orchestrator.pools.completion import Outcome, Progress, WorkerEndpoint

GiB = 2**30
MODEL = "llama-8b"
CATALOG = Catalog(
    models={MODEL: CatalogModel(MODEL, 6 * GiB, estimated_tokens_per_sec={"default": 100.0})}
)
CONFIG = ServiceConfig()


class Clock:
    """A monotonic clock in seconds that moves only when a test sets `now`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(job_id: str, *, at: int = 1_000, priority: str = "batch", **spec: object) -> JobRecord:
    """A job as submit would have stored it (not yet in any store)."""
    fields = {"model": MODEL, "prompt": f"prompt of {job_id}", "max_tokens": 8, **spec}
    return new_record(job_id, SubmitSpec(**fields), MODEL, priority, CATALOG, at)  # type: ignore[arg-type]


@dataclass
class FakeLocalPool:
    """The core's own pool without processes: workers appear as their ids are started,
    in the state a test sets."""

    id: str = "local"
    version: int = 0
    gpus: tuple[Gpu, ...] = (Gpu(0, "NVIDIA A100", 80 * GiB, measured=True),)
    host: HostReading = HostReading(64 * GiB, 60 * GiB, 5.0, 16)
    workers: dict[str, ProcessInfo] = field(default_factory=dict)
    fail_starts: bool = False
    started: list[tuple[str, str, int, int]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return "local:0"

    def read(self, *, force: bool = False) -> tuple[tuple[Gpu, ...], HostReading]:
        return self.gpus, self.host

    def processes(self) -> list[ProcessInfo]:
        return list(self.workers.values())

    def add(self, worker_id: str, status: str = "ready", model: str = MODEL) -> None:
        self.workers[worker_id] = ProcessInfo(
            worker_id, model, (0,), 6 * GiB, f"http://{worker_id}", status, 500
        )
        self.version += 1

    async def start_worker(
        self, worker_id: str, model_ref: str, gpu_id: int, vram_bytes: int
    ) -> object:
        if self.fail_starts:
            raise PoolError("cannot start 'llama-server': No such file or directory")
        self.started.append((worker_id, model_ref, gpu_id, vram_bytes))
        self.add(worker_id, "starting", model_ref)
        return self.workers[worker_id]

    async def evict_worker(self, worker_id: str) -> None:
        self.evicted.append(worker_id)
        self.workers.pop(worker_id, None)
        self.version += 1

    def mark_failed(self, worker_id: str, detail: str) -> None:
        self.failed.append((worker_id, detail))


class FakeCompletions:
    """Completes every job with the outcome a test chose, when the test lets it; or
    raises `error`, as a client with a bug would."""

    def __init__(self) -> None:
        self.outcome = Outcome(True, "done", 3, finish_reason="stop")
        self.error: Exception | None = None
        self.release = asyncio.Event()
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    async def run(
        self, record: JobRecord, worker: WorkerEndpoint, timeout_s: float, progress: Progress
    ) -> Outcome:
        self.calls.append((record.id, worker.uri))
        progress.first_token()
        if self.outcome.output:
            progress.text(self.outcome.output, self.outcome.tokens)
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.outcome

    async def close(self) -> None:
        self.closed = True
