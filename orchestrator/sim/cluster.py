"""The simulated cluster: pools, GPUs, workers and jobs on a simulated clock. Pure.

It turns into a `Context` for each scheduling cycle (reusing unchanged records and
saying what changed, like the live cluster state), applies decisions, and tells the
event loop what happens next (a job finishing, a worker becoming ready or gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.domain.context import (
    Catalog,
    Config,
    Context,
    Gpu,
    Job,
    Pool,
    Tenant,
    Worker,
    derive_metrics,
)
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker, StartWorker, flatten
from orchestrator.sim.workload import Arrival
from orchestrator.state.jobqueue import JobQueue

EPOCH_MS = 1_700_000_000_000  # simulated time 0, as Unix ms
PREFILL_SPEEDUP = 20.0  # prompt tokens are processed this many times faster than generated
# A batched worker running n sequences generates r * n**BATCH_EXPONENT tokens/s in all,
# r being its single-stream rate: each sequence gets r * n**(BATCH_EXPONENT - 1), slower
# as the batch grows while the sum grows. A stand-in, until issue 16's performance
# model, for what batching does to decode, which is memory-bound: one pass over the
# weights serves the whole batch, so the sum grows, but less than linearly. With one
# slot n is 1 and the rate is r.
BATCH_EXPONENT = 0.7


@dataclass(frozen=True)
class ClusterSpec:
    pools: int = 2
    workers_per_pool: int = 4
    gpus_per_pool: int = 0  # 0: one GPU for every two workers
    gpu_name: str = "NVIDIA A100"
    gpu_vram_bytes: int = 80 * 1024**3
    compute_capability: str = "8.0"
    start_delay_ms: int = 5000  # a worker starting: model load
    evict_delay_ms: int = 500
    worker_slots: int = 1  # jobs one worker runs at once (docs/ARCHITECTURE.md D27)


@dataclass
class SimJob:
    arrival: Arrival
    job: Job
    dispatched_ms: int = -1
    done_ms: int = -1
    worker: str = ""


@dataclass
class SimWorker:
    id: str
    pool: str
    model_ref: str
    gpu: int
    vram: int
    status: str  # starting, ready (a slot is free), busy (none is), leaving
    started_ms: int
    slots: int = 1
    running: dict[str, int] = field(default_factory=dict)  # job id -> start, oldest first
    last_used_ms: int = 0
    completed: int = 0
    tokens: int = 0
    busy_ms: int = 0


@dataclass
class Event:
    """What the loop must do at a time: finish a job, ready a worker, drop a worker."""

    kind: str  # done, ready, gone
    target: str  # the job (done) or the worker (ready, gone)


@dataclass
class SimCluster:
    spec: ClusterSpec
    catalog: Catalog
    config: Config
    tenants: tuple[Tenant, ...] = ()
    workers: dict[str, SimWorker] = field(default_factory=dict)
    jobs: dict[str, SimJob] = field(default_factory=dict)
    gpus: dict[tuple[str, int], tuple[str, int, str]] = field(default_factory=dict)
    starts: int = 0
    evictions: int = 0
    _queue: JobQueue = field(default_factory=JobQueue)
    _pool_cache: dict[str, Pool] = field(default_factory=dict)
    _dirty: set[str] = field(default_factory=set)
    _last: Context | None = None
    _next_worker: int = 0

    @property
    def pool_ids(self) -> list[str]:
        return [f"pool-{i + 1}" for i in range(self.spec.pools)]

    def build(self, models: list[str]) -> None:
        """GPUs, and the initial workers spread over `models` in turn."""
        per_pool = self.spec.gpus_per_pool or max(1, (self.spec.workers_per_pool + 1) // 2)
        for pool_id in self.pool_ids:
            for g in range(per_pool):
                self.gpus[(pool_id, g)] = (
                    self.spec.gpu_name,
                    self.spec.gpu_vram_bytes,
                    self.spec.compute_capability,
                )
        index = 0
        for pool_id in self.pool_ids:
            for w in range(self.spec.workers_per_pool):
                model = self.catalog.get(models[index % len(models)])
                index += 1
                if model is None:
                    continue
                gpu = w % per_pool
                if self.free_vram(pool_id, gpu) < model.vram_required_bytes:
                    continue
                self._add_worker(
                    pool_id, gpu, model.model_ref, model.vram_required_bytes, 0, status="ready"
                )

    # ------------------------------------------------------------------ jobs
    def arrive(self, arrival: Arrival, now_ms: int) -> None:
        model = self.catalog.get(arrival.model)
        ref = model.model_ref if model else arrival.model
        rate = model.tokens_per_sec("default") if model else 0.0
        job = Job(
            id=arrival.job_id,
            model_ref=ref,
            priority=arrival.priority,
            tenant_id=arrival.tenant_id,
            prompt_hash=f"sha256:{arrival.job_id}",
            max_tokens=arrival.output_tokens,
            seed=arrival.seed,
            created_at=EPOCH_MS + now_ms,
            queued_at=EPOCH_MS + now_ms,
            estimated_vram_bytes=model.vram_required_bytes if model else 0,
            estimated_duration_ms=int(arrival.output_tokens / rate * 1000) if rate else 0,
        )
        self.jobs[job.id] = SimJob(arrival, job)
        self._queue.insert(job)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ workers
    def _add_worker(
        self, pool: str, gpu: int, model_ref: str, vram: int, now_ms: int, status: str
    ) -> SimWorker:
        self._next_worker += 1
        worker = SimWorker(
            f"{pool}-w{self._next_worker}",
            pool,
            model_ref,
            gpu,
            vram,
            status,
            now_ms,
            slots=self.spec.worker_slots,
            last_used_ms=now_ms,
        )
        self.workers[worker.id] = worker
        self._dirty.add(pool)
        return worker

    def free_vram(self, pool: str, gpu: int) -> int:
        used = sum(w.vram for w in self.workers.values() if w.pool == pool and w.gpu == gpu)
        return self.gpus[(pool, gpu)][1] - used

    def vram_utilization(self) -> float:
        total = sum(g[1] for g in self.gpus.values())
        used = sum(w.vram for w in self.workers.values())
        return used / total if total else 0.0

    # ------------------------------------------------------------------ decisions
    def apply(self, decision: Decision, now_ms: int) -> list[tuple[int, Event]]:
        """Carry out a (validated) decision; returns the events it schedules."""
        events: list[tuple[int, Event]] = []
        for action in flatten(decision):
            if isinstance(action, Dispatch):
                events += self._dispatch(action, now_ms)
            elif isinstance(action, StartWorker):
                model = self.catalog.get(action.model_ref)
                if model is None:
                    continue
                started = self._add_worker(
                    action.pool_id,
                    action.gpu_id,
                    model.model_ref,
                    model.vram_required_bytes,
                    now_ms,
                    "starting",
                )
                self.starts += 1
                events.append((now_ms + self.spec.start_delay_ms, Event("ready", started.id)))
            elif isinstance(action, EvictWorker):
                leaving = self.workers.get(action.worker_id)
                if leaving is None or leaving.running or leaving.status == "leaving":
                    continue
                leaving.status = "leaving"
                self._dirty.add(leaving.pool)
                self.evictions += 1
                events.append((now_ms + self.spec.evict_delay_ms, Event("gone", leaving.id)))
        return events

    def _dispatch(self, action: Dispatch, now_ms: int) -> list[tuple[int, Event]]:
        entry = self.jobs.get(action.job_id)
        worker = self.workers.get(action.worker_id)
        if entry is None or worker is None or worker.status != "ready" or entry.dispatched_ms >= 0:
            return []
        self._queue.remove(entry.job.id)
        entry.dispatched_ms, entry.worker = now_ms, worker.id
        worker.running[entry.job.id] = now_ms
        worker.status = "busy" if len(worker.running) >= worker.slots else "ready"
        worker.last_used_ms = now_ms
        self._dirty.add(worker.pool)
        model = self.catalog.get(worker.model_ref)
        rate = model.tokens_per_sec(self.gpus[(worker.pool, worker.gpu)][0]) if model else 0.0
        # Workers on one GPU share its compute: the rate is split between those running
        # a job when this one starts, and a worker's rate between the sequences in its
        # batch (BATCH_EXPONENT); neither is re-timed as jobs come and go.
        sharing = sum(
            1
            for w in self.workers.values()
            if w.pool == worker.pool and w.gpu == worker.gpu and w.running
        )
        rate = (rate or 10.0) / max(1, sharing) * len(worker.running) ** (BATCH_EXPONENT - 1)
        service = entry.arrival.prompt_tokens / (rate * PREFILL_SPEEDUP) + (
            entry.arrival.output_tokens / rate
        )
        return [(now_ms + max(1, int(service * 1000)), Event("done", entry.job.id))]

    def on(self, event: Event, now_ms: int) -> SimJob | None:
        """An event happens; returns the job it finished, if any."""
        if event.kind == "done":
            return self._finish(event.target, now_ms)
        worker = self.workers.get(event.target)
        if worker is None:
            return None
        self._dirty.add(worker.pool)
        if event.kind == "ready" and worker.status == "starting":
            worker.status = "ready"
        elif event.kind == "gone":
            del self.workers[worker.id]
        return None

    def _finish(self, job_id: str, now_ms: int) -> SimJob | None:
        entry = self.jobs[job_id]
        worker = self.workers.get(entry.worker)
        if worker is None or job_id not in worker.running:
            return None
        self._dirty.add(worker.pool)
        entry.done_ms = now_ms
        worker.completed += 1
        worker.tokens += entry.arrival.output_tokens
        worker.busy_ms += now_ms - worker.running.pop(job_id)
        worker.status = "ready"  # the slot it held is free
        worker.last_used_ms = now_ms
        return entry

    # ------------------------------------------------------------------ the context
    def _pool(self, pool_id: str, at: int) -> Pool:
        cached = self._pool_cache.get(pool_id)
        if cached is not None and pool_id not in self._dirty:
            return cached
        mine = sorted((w for w in self.workers.values() if w.pool == pool_id), key=_by_id)
        # Workers on their way out are hidden, as in the live state; their VRAM is not
        # free until they are gone.
        workers = tuple(_worker(w) for w in mine if w.status != "leaving")
        gpus = []
        for (pid, gid), (name, total, capability) in sorted(self.gpus.items()):
            if pid != pool_id:
                continue
            used = sum(w.vram for w in mine if w.gpu == gid)
            busy = sum(1 for w in mine if w.gpu == gid and w.running)
            utilization = min(100.0, 40.0 * busy)
            gpus.append(Gpu(gid, name, total, used, total - used, capability,
                            utilization_percent=utilization, measured=False))  # fmt: skip
        pool = Pool(pool_id, f"sim://{pool_id}", "healthy", EPOCH_MS + at, tuple(gpus), workers)
        self._pool_cache[pool_id] = pool
        return pool

    def context(self, now_ms: int) -> Context:
        pools = tuple(self._pool(p, now_ms) for p in self.pool_ids)
        self._dirty.clear()
        queue = self._queue.jobs()
        ctx = Context(
            now_ms=EPOCH_MS + now_ms,
            queue=queue,
            pools=pools,
            catalog=self.catalog,
            tenants=self.tenants,
            metrics=derive_metrics(queue, pools, EPOCH_MS + now_ms, totals=self._queue.totals()),
            config=self.config,
            changes=self._queue.take_changes(self._last),
        )
        self._last = ctx
        return ctx


def _by_id(worker: SimWorker) -> str:
    return worker.id


def _worker(w: SimWorker) -> Worker:
    active = tuple(w.running)
    oldest = active[0] if active else None
    return Worker(
        id=w.id,
        model_ref=w.model_ref,
        status=w.status,
        gpu_ids=(w.gpu,),
        vram_bytes=w.vram,
        uri=f"sim://{w.id}",
        current_job_id=oldest,
        job_started_at=None if oldest is None else EPOCH_MS + w.running[oldest],
        jobs_completed=w.completed,
        avg_tokens_per_sec=w.tokens / (w.busy_ms / 1000) if w.busy_ms else 0.0,
        started_at_ms=EPOCH_MS + w.started_ms,
        last_used_at_ms=EPOCH_MS + w.last_used_ms,
        slots_total=w.slots,
        slots_busy=len(active),
        active_job_ids=active,
    )
