"""The simulated cluster: pools, GPUs, and workers that are batched inference servers, on
a simulated clock. Pure.

Contract:
- It turns into a `Context` for each scheduling cycle (reusing unchanged records and
  saying what changed, like the live cluster state). `apply(decision, now)` carries out a
  decision and `on(event, now)` an event; both return the events they schedule, and `on`
  the jobs that finished too.
- A worker is a batched server (docs/SIMULATION.md). A job dispatched to it waits inside
  it, first come first served, until its prompt and output fit the KV cache next to the
  running ones; then its prompt is prefilled, one prompt at a time with decoding stalled
  meanwhile (no chunked prefill); then it decodes in the batch, one token a step, and
  leaves when its output is done. Times come from the catalog's performance model for the
  worker's GPU and model (sim/perf.py); workers busy on one GPU share it, each running as
  many times slower as they are.
- Between two changes to a worker (a job in, a prefill done, a job out) its batch is
  fixed, so its progress is computed, not stepped: a worker has at most one pending event,
  at its next change, whatever the number of tokens. An event carries the worker's
  version when it was planned; a later plan makes it stale, and a stale event is ignored.
- The KV cache (in tokens: the GPU's VRAM less the weights on it, shared evenly between
  its workers, over the model's bytes per token, as domain/prefix_queries.py computes it) holds
  the running sequences and a prefix cache of prompt blocks. A running sequence pins its
  prompt's blocks; the others go least recently used first, a prompt's last block before
  its first. At admission (`SimJob.admitted_ms`), the prompt's leading blocks already
  cached are not prefilled (`SimJob.cached_tokens`). When a worker joins or leaves a
  GPU, the shares are recomputed and jobs waiting for room that now fit are admitted
  at that instant.
- The policy's view is the core's: a `PrefixIndex` records each dispatch and each
  session's worker, as the live core does; it is approximate, the workers' caches are not.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
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
    estimate_job,
)
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker, StartWorker, flatten
from orchestrator.domain.prefix import (
    BLOCK_TOKENS,
    NO_TENANT,
    capacity_blocks,
    id_blocks,
    matched_blocks,
)
from orchestrator.domain.prefix_queries import kv_share_tokens
from orchestrator.domain.serving import ServingPerf, for_device
from orchestrator.sim import perf
from orchestrator.sim.workload import Arrival
from orchestrator.state.jobqueue import JobQueue
from orchestrator.state.prefix import PrefixIndex

EPOCH_MS = 1_700_000_000_000  # simulated time 0, as Unix ms
# Progress is computed in float ms; a change due within this of a time has happened.
EPSILON = 1e-6


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
    # Jobs one worker holds at once, running or waiting inside it for KV room
    # (docs/ARCHITECTURE.md D27): llama-server's --parallel, vLLM's max_num_seqs.
    worker_slots: int = 16
    block_tokens: int = BLOCK_TOKENS  # tokens of a prompt block, in caches and the index


@dataclass
class SimJob:
    arrival: Arrival
    job: Job
    dispatched_ms: int = -1
    # When its worker admitted it (found KV room for it and looked its prompt up in the
    # prefix cache; its prefill follows); -1 while it waits inside the worker for room.
    admitted_ms: int = -1
    first_token_ms: int = -1  # when its first output token came out (TTFT's end)
    done_ms: int = -1
    worker: str = ""
    cached_tokens: int = 0  # prompt tokens its worker found in its prefix cache, at admission


@dataclass
class Event:
    """What the loop must do at a time: ready a worker, drop a worker, or bring a
    worker's batch up to date (`batch`, valid while the worker's version is `version`)."""

    kind: str  # ready, gone, batch
    target: str  # the worker
    version: int = 0


@dataclass
class _Seq:
    """A job inside a worker."""

    entry: SimJob
    blocks: tuple[int, ...]  # its prompt's full blocks: held in the cache while it runs
    extra: int  # KV tokens it holds beyond those blocks: the prompt's tail and the output
    joined: float = 0.0  # the worker's decode step count when it joined the batch


class _KvCache:
    """A worker's KV cache, in tokens: prompt blocks (pinned while a running sequence
    uses them, else least recently used first) and what running sequences hold beyond
    their blocks."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self.pinned: dict[int, int] = {}  # hash -> running sequences using it
        self.free: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.extra = 0

    @property
    def used(self) -> int:
        return (len(self.pinned) + len(self.free)) * self.block_tokens + self.extra

    def __contains__(self, block: object) -> bool:
        return block in self.pinned or block in self.free

    def take(self, seq: _Seq, capacity: int, force: bool) -> bool:
        """Room for a sequence, evicting unpinned blocks as needed; False (and nothing
        changed) if it does not fit, unless `force`."""
        distinct = dict.fromkeys(seq.blocks)
        new = sum(1 for b in distinct if b not in self)
        reused_free = sum(1 for b in distinct if b in self.free)
        need = new * self.block_tokens + seq.extra
        evictable = (len(self.free) - reused_free) * self.block_tokens
        if not force and need > capacity - self.used + evictable:
            return False
        for block in seq.blocks:
            self.free.pop(block, None)
            self.pinned[block] = self.pinned.get(block, 0) + 1
        # The sequence's new blocks are counted in `used` now: evict for the rest.
        while self.free and capacity - self.used < seq.extra:
            self.free.popitem(last=False)
        self.extra += seq.extra
        return True

    def release(self, seq: _Seq) -> None:
        self.extra -= seq.extra
        # Last block first, so that the first, which more prompts share, goes last.
        for block in reversed(seq.blocks):
            count = self.pinned[block] - 1
            if count:
                self.pinned[block] = count
            else:
                del self.pinned[block]
                self.free[block] = None


class _Server:
    """One worker's batch: jobs waiting for KV room, prompts to prefill (the first one
    prefilling), sequences decoding; advanced in fluid time (module docstring)."""

    def __init__(self, model: ServingPerf, block_tokens: int) -> None:
        self.perf = model
        self.cache = _KvCache(block_tokens)
        self.waiting: deque[_Seq] = deque()
        self.prefills: deque[_Seq] = deque()
        self.prefill_left_ms = 0.0  # of the first prefill, at the GPU's full speed
        self.decoding: dict[str, _Seq] = {}
        self.ends: list[tuple[float, str]] = []  # (step its last token comes at, job)
        self.firsts: list[tuple[float, str]] = []  # (step its first token comes at, job)
        self.steps = 0.0  # decode steps done since the worker started
        self.offset = 0.0  # total context = offset + len(decoding) * steps
        self.clock = 0.0  # ms up to which progress is computed
        self.share = 1  # busy workers on the GPU since `clock`
        self.busy_ms = 0.0
        self.version = 0

    @property
    def active(self) -> bool:
        return bool(self.prefills or self.decoding)

    def add(self, seq: _Seq) -> None:
        self.waiting.append(seq)

    def advance(self, to_ms: float, capacity: int) -> list[tuple[_Seq, float]]:
        """Progress up to `to_ms`; returns the sequences that finished, with when."""
        done: list[tuple[_Seq, float]] = []
        t = self.clock
        while True:
            self._admit(capacity, t)
            if self.prefills:
                need = self.prefill_left_ms * self.share
                if t + need > to_ms + EPSILON:
                    spent = max(0.0, to_ms - t)  # t may pass to_ms by EPSILON
                    self.prefill_left_ms -= spent / self.share
                    self.busy_ms += spent
                    break
                t += need
                self.busy_ms += need
                self._join(self.prefills.popleft())
                if self.prefills:
                    self._start_prefill(self.prefills[0])
            elif self.decoding:
                n = len(self.decoding)
                context = self.offset + n * self.steps
                due = self.ends[0][0] - self.steps
                need = perf.decode_ms(self.perf, n, context, due) * self.share
                last = t + need <= to_ms + EPSILON
                if last:
                    steps, elapsed = due, need
                else:
                    elapsed = max(0.0, to_ms - t)
                    steps = perf.decode_steps(self.perf, n, context, elapsed / self.share)
                self._first_tokens(t, n, context, steps)
                self.steps += steps
                t += elapsed
                self.busy_ms += elapsed
                if not last:
                    break
                while self.ends and self.ends[0][0] <= self.steps + EPSILON:
                    seq = self.decoding.pop(heapq.heappop(self.ends)[1])
                    self.offset -= seq.entry.arrival.prompt_tokens - seq.joined
                    self.cache.release(seq)
                    done.append((seq, t))
            else:
                break
        self.clock = to_ms
        return done

    def next_change(self) -> float | None:
        """When the batch next changes, at the current share; None if idle."""
        if self.prefills:
            return self.clock + self.prefill_left_ms * self.share
        if self.decoding:
            n = len(self.decoding)
            context = self.offset + n * self.steps
            due = self.ends[0][0] - self.steps
            return self.clock + perf.decode_ms(self.perf, n, context, due) * self.share
        return None

    def _admit(self, capacity: int, t: float) -> None:
        while self.waiting:
            seq = self.waiting[0]
            # A job too big for an empty server still runs, alone: it would wait forever.
            alone = not (self.decoding or self.prefills)
            matched = matched_blocks(self.cache, seq.blocks)
            if not self.cache.take(seq, capacity, force=alone):
                return
            self.waiting.popleft()
            prompt = seq.entry.arrival.prompt_tokens
            # The last prompt token is always computed: its logits give the first token.
            seq.entry.cached_tokens = max(0, min(matched * self.cache.block_tokens, prompt - 1))
            seq.entry.admitted_ms = _ms(t)
            self.prefills.append(seq)
            if len(self.prefills) == 1:
                self._start_prefill(seq)

    def _start_prefill(self, seq: _Seq) -> None:
        cached = seq.entry.cached_tokens
        uncached = seq.entry.arrival.prompt_tokens - cached
        self.prefill_left_ms = perf.prefill_ms(self.perf, uncached, cached)

    def _join(self, seq: _Seq) -> None:
        seq.joined = self.steps
        self.offset += seq.entry.arrival.prompt_tokens - self.steps
        self.decoding[seq.entry.job.id] = seq
        output = max(1, seq.entry.arrival.output_tokens)
        heapq.heappush(self.ends, (self.steps + output, seq.entry.job.id))
        heapq.heappush(self.firsts, (self.steps + 1, seq.entry.job.id))

    def _first_tokens(self, t: float, n: int, context: float, steps: float) -> None:
        """Record the first tokens that come within the next `steps` steps from `t`."""
        while self.firsts and self.firsts[0][0] <= self.steps + steps + EPSILON:
            # A first token comes before the last, so its sequence is still decoding.
            step, job_id = heapq.heappop(self.firsts)
            ahead = max(0.0, step - self.steps)
            at = t + perf.decode_ms(self.perf, n, context, ahead) * self.share
            self.decoding[job_id].entry.first_token_ms = _ms(at)


@dataclass
class SimWorker:
    id: str
    pool: str
    model_ref: str
    gpu: int
    vram: int
    status: str  # starting, ready (a slot is free), busy (none is), leaving
    started_ms: int
    server: _Server
    slots: int = 1
    running: dict[str, int] = field(default_factory=dict)  # job id -> dispatch, oldest first
    kv_tokens: int = 0  # its share of its GPU's KV cache
    last_used_ms: int = 0
    completed: int = 0
    tokens: int = 0  # output tokens of the jobs it completed
    # Time it had a prompt to prefill or a batch to decode, as of its last completion.
    busy_ms: int = 0


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
    index: PrefixIndex = field(init=False)
    _queue: JobQueue = field(default_factory=JobQueue)
    _pool_cache: dict[str, Pool] = field(default_factory=dict)
    _worker_cache: dict[str, tuple[tuple[object, ...], Worker]] = field(default_factory=dict)
    _dirty: set[str] = field(default_factory=set)
    _last: Context | None = None
    _next_worker: int = 0
    _finished: list[SimJob] = field(default_factory=list)  # since `on` last returned them
    # The workers on each GPU: a change to one worker re-plans those, not the cluster.
    _by_gpu: dict[tuple[str, int], list[SimWorker]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = PrefixIndex(self.spec.block_tokens)

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
        for pool_id, gpu in self.gpus:
            self._size_caches(pool_id, gpu)

    # ------------------------------------------------------------------ jobs
    def arrive(self, arrival: Arrival, now_ms: int) -> None:
        model = self.catalog.get(arrival.model)
        ref = model.model_ref if model else arrival.model
        vram, duration = estimate_job(self.catalog, ref, arrival.output_tokens)
        tenant = arrival.tenant_id
        job = Job(
            id=arrival.job_id,
            model_ref=ref,
            priority=arrival.priority,
            tenant_id=tenant,
            session_id=arrival.session_id,
            prompt_hash=f"sha256:{arrival.job_id}",
            max_tokens=arrival.output_tokens,
            seed=arrival.seed,
            created_at=EPOCH_MS + now_ms,
            queued_at=EPOCH_MS + now_ms,
            estimated_vram_bytes=vram,
            estimated_duration_ms=duration,
            prompt_tokens=arrival.prompt_tokens,
            block_hashes=id_blocks(arrival.prompt_block_ids, tenant or NO_TENANT),
            session_worker=self.index.session_worker(tenant, arrival.session_id),
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
        server = _Server(self._perf(model_ref, self.gpus[(pool, gpu)][0]), self.spec.block_tokens)
        server.clock = now_ms
        worker = SimWorker(
            f"{pool}-w{self._next_worker}",
            pool,
            model_ref,
            gpu,
            vram,
            status,
            now_ms,
            server,
            slots=self.spec.worker_slots,
            last_used_ms=now_ms,
        )
        self.workers[worker.id] = worker
        self._by_gpu.setdefault((pool, gpu), []).append(worker)
        self._dirty.add(pool)
        return worker

    def _perf(self, model_ref: str, device_name: str) -> ServingPerf:
        """The catalog's performance model of a model on a GPU."""
        model = self.catalog.get(model_ref)
        if model is None:
            return perf.fallback(0.0)
        found = for_device(model.performance, device_name)
        return found or perf.fallback(model.tokens_per_sec(device_name))

    def free_vram(self, pool: str, gpu: int) -> int:
        return self.gpus[(pool, gpu)][1] - sum(w.vram for w in self._on_gpu(pool, gpu))

    def vram_utilization(self) -> float:
        total = sum(g[1] for g in self.gpus.values())
        used = sum(w.vram for w in self.workers.values())
        return used / total if total else 0.0

    def models_served(self) -> tuple[set[str], set[str]]:
        """The models some worker serves (not on its way out), and those of which a
        worker has a free slot now."""
        served: set[str] = set()
        free: set[str] = set()
        for worker in self.workers.values():
            if worker.status != "leaving":
                served.add(worker.model_ref)
            if worker.status == "ready":
                free.add(worker.model_ref)
        return served, free

    def _on_gpu(self, pool: str, gpu: int) -> list[SimWorker]:
        return self._by_gpu.get((pool, gpu), [])

    def _size_caches(self, pool: str, gpu: int) -> None:
        """The KV capacity of each worker on a GPU, by the rule the index uses
        (domain/prefix_queries.py): its VRAM less every worker's weights, evenly shared.
        Workers on their way out still hold their weights, so they count."""
        total = self.gpus[(pool, gpu)][1]
        here = self._on_gpu(pool, gpu)
        weights = sum(w.vram for w in here)
        for worker in here:
            worker.kv_tokens = kv_share_tokens(
                self.catalog, worker.model_ref, total, weights, len(here)
            )

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
                # Its weights take room from the KV caches of the GPU's other workers.
                events += self._resize(action.pool_id, action.gpu_id, now_ms)
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
        job = entry.job
        self._queue.remove(job.id)
        entry.dispatched_ms, entry.worker = now_ms, worker.id
        worker.running[job.id] = now_ms
        worker.status = "busy" if len(worker.running) >= worker.slots else "ready"
        worker.last_used_ms = now_ms
        self._dirty.add(worker.pool)
        # What the core learns from a dispatch, as the live core records it.
        room = capacity_blocks(worker.kv_tokens, self.index.block_tokens)
        self.index.record(worker.id, job.tenant_id, job.block_hashes, room)
        self.index.route(job.tenant_id, job.session_id, worker.id)
        block_tokens = self.spec.block_tokens
        full = job.block_hashes[: entry.arrival.prompt_tokens // block_tokens]
        extra = entry.arrival.prompt_tokens - len(full) * block_tokens
        seq = _Seq(entry, full, extra + max(1, entry.arrival.output_tokens))
        return self._touch(worker, now_ms, seq)

    # ------------------------------------------------------------------ events
    def current(self, event: Event) -> bool:
        """Whether an event still stands: a `batch` event is superseded once its worker
        is re-planned (a newer version) or gone; `ready` and `gone` always stand."""
        if event.kind != "batch":
            return True
        worker = self.workers.get(event.target)
        return worker is not None and event.version == worker.server.version

    def on(self, event: Event, now_ms: int) -> tuple[list[SimJob], list[tuple[int, Event]]]:
        """An event happens; returns the jobs that finished and the events it schedules."""
        events: list[tuple[int, Event]] = []
        worker = self.workers.get(event.target)
        if worker is not None:
            if event.kind == "batch" and self.current(event):
                events = self._touch(worker, now_ms)
            elif event.kind == "ready" and worker.status == "starting":
                worker.status = "ready"
                self._dirty.add(worker.pool)
            elif event.kind == "gone":
                del self.workers[worker.id]
                self._worker_cache.pop(worker.id, None)
                self._by_gpu[(worker.pool, worker.gpu)].remove(worker)
                self.index.forget(worker.id)
                self._dirty.add(worker.pool)
                events = self._resize(worker.pool, worker.gpu, now_ms)
        finished, self._finished = self._finished, []
        return finished, events

    def _resize(self, pool: str, gpu: int, now_ms: int) -> list[tuple[int, Event]]:
        """The GPU's workers changed: new KV shares, which may admit waiting jobs now."""
        here = self._on_gpu(pool, gpu)
        for worker in here:
            self._advance(worker, now_ms)  # up to now, at the old shares
        self._size_caches(pool, gpu)
        for worker in here:
            self._advance(worker, now_ms)  # admits at now what the new shares fit
        return self._plan(pool, gpu, now_ms) if here else []

    def _touch(
        self, worker: SimWorker, now_ms: int, seq: _Seq | None = None
    ) -> list[tuple[int, Event]]:
        """Bring the worker's GPU up to `now_ms`, add `seq` to the worker, and plan the
        next change of every worker on the GPU (their shares may have changed)."""
        for other in self._on_gpu(worker.pool, worker.gpu):
            self._advance(other, now_ms)
        if seq is not None:
            worker.server.add(seq)
            self._advance(worker, now_ms)  # admits it, if it fits
        return self._plan(worker.pool, worker.gpu, now_ms)

    def _advance(self, worker: SimWorker, now_ms: int) -> None:
        server = worker.server
        for seq, at in server.advance(now_ms, worker.kv_tokens):
            entry = seq.entry
            entry.done_ms = _ms(at)
            del worker.running[entry.job.id]
            worker.completed += 1
            worker.tokens += entry.arrival.output_tokens
            worker.status = "ready"  # the slot it held is free
            worker.last_used_ms = entry.done_ms
            # Read at completions only, as the live core's WorkerStats is: a worker's
            # record then changes when a job comes or goes, not at every advance, and a
            # cycle's delta carries only the workers that did.
            worker.busy_ms = round(server.busy_ms)
            self._dirty.add(worker.pool)
            self._finished.append(entry)

    def _plan(self, pool: str, gpu: int, now_ms: int) -> list[tuple[int, Event]]:
        """The next change of each worker on a GPU, at the GPU's new share."""
        here = self._on_gpu(pool, gpu)
        share = max(1, sum(1 for w in here if w.server.active))
        events = []
        for worker in here:
            server = worker.server
            server.share = share
            server.version += 1
            when = server.next_change()
            if when is not None:
                # Whole ms, after now: a change within this ms is handled when it comes.
                at = max(now_ms + 1, math.ceil(when - EPSILON))
                events.append((at, Event("batch", worker.id, server.version)))
        return events

    # ------------------------------------------------------------------ the context
    def _pool(self, pool_id: str, at: int) -> Pool:
        cached = self._pool_cache.get(pool_id)
        if cached is not None and pool_id not in self._dirty:
            return cached
        mine = sorted((w for w in self.workers.values() if w.pool == pool_id), key=_by_id)
        # Workers on their way out are hidden, as in the live state; their VRAM is not
        # free until they are gone.
        workers = tuple(self._worker_record(w) for w in mine if w.status != "leaving")
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

    def _worker_record(self, w: SimWorker) -> Worker:
        """The worker as the context shows it: the same object while nothing it shows
        changed, so that a delta skips it by identity."""
        key = (w.status, w.completed, w.busy_ms, w.last_used_ms, tuple(w.running))
        cached = self._worker_cache.get(w.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        record = _worker(w)
        self._worker_cache[w.id] = (key, record)
        return record

    def context(self, now_ms: int) -> Context:
        pools = tuple(self._pool(p, now_ms) for p in self.pool_ids)
        self._dirty.clear()
        queue = self._queue.snapshot()
        ctx = Context(
            now_ms=EPOCH_MS + now_ms,
            queue=queue,
            pools=pools,
            catalog=self.catalog,
            tenants=self.tenants,
            metrics=derive_metrics(queue, pools, EPOCH_MS + now_ms, totals=queue.totals()),
            config=self.config,
            changes=self._queue.take_changes(self._last),
            prefix=self.index.state(),
        )
        self._last = ctx
        return ctx


def _ms(at: float) -> int:
    """A simulated time as whole ms: the ms within which it falls, counted up."""
    return math.ceil(at - EPSILON)


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
