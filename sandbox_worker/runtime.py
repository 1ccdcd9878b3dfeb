"""The worker's Lua runtime: one lupa LuaRuntime, one scheduler, the context it is fed.

Inside-the-worker code only. The files under `lua/` are the trusted Lua half
(`lua/loader.lua` loads them in their fixed order; `lua/README.md`); this module
moves protobuf context updates into it and turns what it returns into replies.
Nothing here raises to the servicer for a failure of the script: every outcome is
a `RunResult`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from itertools import chain
from typing import Any

from orchestrator._proto import context_pb2, sandbox_pb2
from orchestrator.sandbox.limits import MiB, SandboxLimits

# Lua memory the context takes, per record, on top of the script's own heap cap.
# Measured at roughly a third of these on both runtimes; the slack is deliberate.
STATE_BYTES_PER_JOB = 2048
STATE_BYTES_PER_WORKER = 4096
STATE_BYTES_PER_MODEL = 2048
STATE_BYTES_PER_RUNNING_JOB = 256  # an id in a worker's active_job_ids, master and copy
STATE_BYTES_PER_BLOCK = 64  # a block hash, in a job's list or a worker's set
# A full snapshot's job columns are kept while any of its jobs reads from them, and
# counted on top of the jobs themselves (a job's row outlives it until then). Measured
# at about 440 bytes a row at 100,000 jobs once 99% of them left.
STATE_BYTES_PER_SNAPSHOT_ROW = 1024
STATE_BYTES_BASE = 4 * 1024 * 1024
# Above this share of the cap after a call, the worker retires before it fails.
MEMORY_PRESSURE = 0.85

_MODULES: dict[int, str] = {
    sandbox_pb2.LANGUAGE_LUAJIT: "lupa.luajit21",
    sandbox_pb2.LANGUAGE_LUA54: "lupa.lua54",
}

ErrorKind = sandbox_pb2.ErrorKind


@functools.cache
def _lua_sources() -> dict[str, str]:
    """Every trusted Lua file, by its path under lua/ ("builtins/queue.lua").

    loader.lua decides what is loaded and in which order; it refuses a file it does
    not name. Read once per process.
    """
    sources: dict[str, str] = {}

    def walk(directory: Traversable, prefix: str) -> None:
        for entry in directory.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".lua"):
                sources[prefix + entry.name] = entry.read_text()

    walk(resources.files("sandbox_worker").joinpath("lua"), "")
    return sources


def _deny_attribute(obj: object, name: object, is_setting: bool) -> object:
    # Defense in depth: no Python object should ever reach Lua, but if one does,
    # none of its attributes are reachable.
    raise AttributeError("access to Python objects is not allowed")


@dataclass
class RunResult:
    """What one schedule() call produced, ready to become a ScheduleReply."""

    decision: context_pb2.Decision | None = None
    error_kind: int = ErrorKind.ERROR_KIND_UNSPECIFIED
    error_message: str = ""
    traceback: str = ""
    logs: list[tuple[str, str]] = field(default_factory=list)
    logs_dropped: int = 0
    metrics: list[tuple[str, float]] = field(default_factory=list)
    metrics_dropped: int = 0
    refresh_requested: bool = False
    retire: bool = False
    diagnostics: sandbox_pb2.Diagnostics | None = None


class LuaSchedulerRuntime:
    """Owns the LuaRuntime of one worker: load once, then apply updates and run."""

    def __init__(self, language: int) -> None:
        module = importlib.import_module(_MODULES.get(language, "lupa.luajit21"))
        self.lua = module.LuaRuntime(
            max_memory=0,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attribute,
        )
        self.lua_version = str(self.lua.eval("_VERSION"))
        if self.lua.eval("type(jit) == 'table'"):
            self.lua_version = str(self.lua.eval("jit.version"))
        sources = _lua_sources()
        compile_loader = self.lua.eval(
            "function(src, name) return assert(load(src, name, 't')) end"
        )
        loader = compile_loader(sources["loader.lua"], "=sandbox/loader.lua")
        self.host = loader(self.lua.table_from(sources))
        self.lua.execute("python = nil")
        self.limits = SandboxLimits()
        self.source_sha256 = ""
        self.chunkname = ""
        self.source_lines = 0
        self.loaded = False
        h = self.host
        self._put_jobs = h.put_jobs
        self._put_pool = h.put_pool
        self._layouts: dict[tuple[str, ...], object] = {}
        # Looked up now: under the cap, even looking up a field can fail (see _capped).
        self._run = h.run
        self._collect = self.lua.eval("collectgarbage")

    # ------------------------------------------------------------------ load
    def load(self, request: sandbox_pb2.LoadRequest) -> sandbox_pb2.LoadReply:
        self.limits = SandboxLimits.from_proto(request.limits)
        lim = self.limits
        self.host.configure(
            lim.max_log_records,
            lim.max_log_bytes,
            lim.max_metrics,
            lim.max_batch_actions,
            lim.max_string_bytes,
        )
        name = request.name or "scheduler.lua"
        if name.startswith("sandbox/") or name in ("platform.lua", "literal"):
            # The chunk names of trusted code: instrument.lua tells the script's lines by
            # their chunk name, so the script must not take one of them.
            name = "script/" + name
        name = "=" + name
        self.chunkname = name
        self.source_lines = request.source.count("\n") + 1
        load = self.host.load
        try:
            with self._capped(STATE_BYTES_BASE + lim.lua_heap_bytes):
                ok, message, traceback = load(
                    request.source, name, request.platform_source, request.expose_platform_source
                )
        except Exception as exc:  # lupa's LuaMemoryError and friends
            ok, message, traceback = False, f"{type(exc).__name__}: {exc}", ""
        self.source_sha256 = hashlib.sha256(request.source.encode()).hexdigest()
        reply = sandbox_pb2.LoadReply(
            ok=bool(ok), source_sha256=self.source_sha256, lua_version=self.lua_version
        )
        if ok:
            self.loaded = True
        else:
            reply.error.kind = ErrorKind.ERROR_KIND_LUA_ERROR
            reply.error.message = str(message)
            reply.error.traceback = str(traceback or "")
        return reply

    # ------------------------------------------------------------------ context
    def apply_snapshot(self, snap: context_pb2.Context) -> None:
        h = self.host
        h.reset()
        h.set_now(snap.now_ms)
        self._jobs(snap.queue, h.put_snapshot_jobs)
        gpu_pools: list[str] = []
        gpus: list[context_pb2.Gpu] = []
        worker_pools: list[str] = []
        workers: list[context_pb2.Worker] = []
        for pool in snap.pools:
            self._pool_info(pool.info)
            # The pool's id, not the records' pool_id: a snapshot nests them in their pool.
            gpu_pools += [pool.info.id] * len(pool.gpus)
            gpus += pool.gpus
            worker_pools += [pool.info.id] * len(pool.workers)
            workers += pool.workers
        self._gpus(gpu_pools, gpus)
        self._workers(worker_pools, workers)
        self._catalog(snap.catalog)
        self._tenants(snap.tenants)
        self._metrics(snap.metrics)
        self._config(snap.config)
        h.set_block_tokens(snap.prefix.block_tokens)
        self._blocks(snap.prefix.held, add=True)
        h.commit()

    def apply_delta(self, delta: context_pb2.ContextDelta) -> None:
        h = self.host
        h.set_now(delta.now_ms)
        if delta.remove_jobs:
            h.remove_jobs(len(delta.remove_jobs), self.lua.table_from(delta.remove_jobs[:]))
        self._jobs(delta.upsert_jobs, self._put_jobs)
        for worker_id in delta.remove_workers:
            h.remove_worker(worker_id)
        for key in delta.remove_gpus:
            h.remove_gpu(key.pool_id, key.id)
        for pool_id in delta.remove_pools:
            h.remove_pool(pool_id)
        for info in delta.upsert_pools:
            self._pool_info(info)
        self._gpus([g.pool_id for g in delta.upsert_gpus], delta.upsert_gpus)
        self._workers([w.pool_id for w in delta.upsert_workers], delta.upsert_workers)
        if delta.HasField("catalog"):
            self._catalog(delta.catalog)
        if delta.HasField("tenants"):
            self._tenants(delta.tenants)
        self._metrics(delta.metrics)
        if delta.HasField("config"):
            self._config(delta.config)
        h.set_block_tokens(delta.block_tokens)
        self._blocks(delta.remove_blocks, add=False)
        self._blocks(delta.add_blocks, add=True)
        h.commit()

    def _blocks(self, changes: Sequence[context_pb2.HeldBlocks], *, add: bool) -> None:
        if not changes:
            return
        t = self.lua.table_from
        self.host.put_blocks(
            len(changes),
            t([c.worker_id for c in changes]),
            t([len(c.hashes) for c in changes]),
            t([h for c in changes for h in c.hashes]),
            add,
        )

    def _jobs(self, columns: context_pb2.JobColumns, put: Callable[..., object]) -> None:
        """The jobs as one Lua array: each column sent in turn, then the block hashes.

        A slice is the cheapest way to take a repeated field's values out of protobuf;
        one conversion instead of one per column spares lupa's per-call cost. A column
        that holds only unset values is not sent: at 10,000 jobs each one is about half
        a millisecond of conversion.
        """
        n = len(columns.id)
        if n == 0:
            return
        names = list(_JOB_COLUMNS)
        parts = [getattr(columns, name)[:] for name in names]
        for name in _SPARSE_JOB_COLUMNS:
            values = getattr(columns, name)[:]
            if any(values):
                names.append(name)
                parts.append(values)
        if "block_counts" in names:
            # Sent whenever a job has blocks, whatever their values (a hash may be 0).
            parts.append(columns.block_hashes[:])
        put(n, self._layout(tuple(names)), self.lua.table_from(*parts))

    def _layout(self, names: tuple[str, ...]) -> object:
        """The column names as a Lua array; one table per set of names, made once."""
        layout = self._layouts.get(names)
        if layout is None:
            layout = self._layouts[names] = self.lua.table_from(names)
        return layout

    def _pool_info(self, p: context_pb2.PoolInfo) -> None:
        self._put_pool(
            p.id,
            p.endpoint,
            p.status,
            p.last_heartbeat_ms,
            self.lua.table_from(p.cached_models),
            p.host_ram_total_bytes,
            p.host_ram_available_bytes,
            p.host_cpu_percent,
            p.host_cpu_count,
        )

    # GPUs and workers travel as one Lua array each, their sections one after another
    # (context.lua's put_gpus and put_workers say which): one conversion per update.
    # attrgetter reads a record's fields in one call.
    def _gpus(self, pool_ids: Sequence[str], gpus: Sequence[context_pb2.Gpu]) -> None:
        if not gpus:
            return
        rows = list(chain.from_iterable(map(_gpu_row, gpus)))
        self.host.put_gpus(len(gpus), self.lua.table_from(pool_ids, rows))

    def _workers(self, pool_ids: Sequence[str], workers: Sequence[context_pb2.Worker]) -> None:
        if not workers:
            return
        gpu_ids = [w.gpu_ids for w in workers]
        active = [w.active_job_ids for w in workers]
        flat = self.lua.table_from(
            pool_ids,
            list(chain.from_iterable(map(_worker_row, workers))),
            [w.job_started_at if w.HasField("job_started_at") else -1 for w in workers],
            list(map(len, gpu_ids)),
            list(map(len, active)),
            list(chain.from_iterable(gpu_ids)),
            list(chain.from_iterable(active)),
        )
        self.host.put_workers(len(workers), flat)

    def _catalog(self, c: context_pb2.Catalog) -> None:
        h = self.host
        h.clear_catalog()
        for m in c.models:
            h.put_model(
                m.model_ref,
                m.family,
                m.size,
                m.quantization,
                m.vram_required_bytes,
                m.context_length,
                m.supports_determinism,
                m.supports_streaming,
                self.lua.table_from(dict(m.estimated_tokens_per_sec)),
                m.file_size_bytes,
                m.file_hash,
                m.min_compute_capability,
            )
        for name, target in c.aliases.items():
            h.put_alias(name, target)

    def _tenants(self, ts: context_pb2.TenantSet) -> None:
        h = self.host
        h.clear_tenants()
        for t in ts.tenants:
            h.put_tenant(
                t.id,
                t.name,
                t.quota_vram_bytes if t.HasField("quota_vram_bytes") else None,
                t.quota_max_concurrent_jobs if t.HasField("quota_max_concurrent_jobs") else None,
                t.quota_tokens_daily if t.HasField("quota_tokens_daily") else None,
                t.vram_used_bytes,
                t.concurrent_jobs,
                t.tokens_used_today,
                t.quota_reset_at,
                t.quota_exceeded,
            )

    def _metrics(self, m: context_pb2.Metrics) -> None:
        self.host.set_metrics(self.lua.table_from(_fields(m)))

    def _config(self, c: context_pb2.Config) -> None:
        t = self.lua.table_from
        self.host.set_config(
            t({"mode": c.mode, "deployment_mode": c.deployment_mode}),
            t(_fields(c.queue)),
            t(_fields(c.timeout)),
            t(_fields(c.retry)),
            t(_fields(c.eviction)),
        )

    def _memory_cap(self) -> int:
        """The script's heap on top of what the context the worker holds now takes."""
        jobs, workers, _gpus, models, tenants, running, blocks, rows = self.host.counts()
        state = (
            STATE_BYTES_BASE
            + jobs * STATE_BYTES_PER_JOB
            + rows * STATE_BYTES_PER_SNAPSHOT_ROW
            + (workers + tenants) * STATE_BYTES_PER_WORKER
            + models * STATE_BYTES_PER_MODEL
            + running * STATE_BYTES_PER_RUNNING_JOB
            + blocks * STATE_BYTES_PER_BLOCK
        )
        return int(state) + self.limits.lua_heap_bytes

    @contextlib.contextmanager
    def _capped(self, cap: int) -> Iterator[None]:
        """The Lua heap cap, on while user code runs and only then.

        Set right before every call into the script, whatever came before it (a full
        snapshot, deltas, or nothing: a worker's first call after a resync or a spare's
        background sync carries no update, and the cap used to be set only by one).
        Lifted when the call returns: applying a context must not fail because of what
        the script left behind, and Python reading Lua values outside a protected call
        must never meet the cap (LuaJIT then aborts the process: "PANIC: unprotected
        error in call to Lua API (not enough memory)").
        """
        self.lua.set_max_memory(cap)
        try:
            yield
        finally:
            self.lua.set_max_memory(0)

    @property
    def memory_used(self) -> int:
        return int(self.lua.get_memory_used() or 0)

    # ------------------------------------------------------------------ run
    def run(
        self,
        refresh_available: bool,
        pool_state_fresh: bool,
        *,
        instrument: int = sandbox_pb2.INSTRUMENT_NONE,
        debug_wait: Callable[..., object] | None = None,
    ) -> RunResult:
        """One schedule() call. `instrument` traces, profiles or debugs it (lua/instrument.lua);
        only a diagnostics worker passes one (server.py), and `debug_wait` with DEBUG."""
        if instrument == sandbox_pb2.INSTRUMENT_NONE:
            return self._call(refresh_available, pool_state_fresh)
        self.host.set_instrument(
            _INSTRUMENT_MODES[instrument], self.chunkname, self.source_lines, MAX_TRACE_STEPS,
            MAX_TRACE_CALLS, debug_wait, time.perf_counter,
        )  # fmt: skip
        try:
            result = self._call(refresh_available, pool_state_fresh)
            result.diagnostics = self._diagnostics(instrument)
        finally:
            self.host.set_instrument(None)
        return result

    def _diagnostics(self, instrument: int) -> sandbox_pb2.Diagnostics:
        """The record of the call just made, as instrument.lua keeps it."""
        lines, steps, steps_dropped, calls, calls_dropped, functions, clock_ms = (
            self.host.instrument_record()
        )
        out = sandbox_pb2.Diagnostics(
            instrument=instrument,  # type: ignore[arg-type]
            file=self.chunkname.removeprefix("="),
            steps=list(steps.values()),
            steps_dropped=int(steps_dropped),
            calls_dropped=int(calls_dropped),
            clock_ms=float(clock_ms),
        )
        out.lines.extend(
            sandbox_pb2.SourceLine(line=int(r[1]), count=int(r[2]), self_ms=float(r[3]))
            for r in lines.values()
        )
        out.calls.extend(
            sandbox_pb2.BuiltinCall(
                name=str(c["name"]),
                args=str(c["args"]),
                result=str(c["result"]),
                line=int(c["line"]),
                step=int(c["step"]),
                raised=bool(c["raised"]),
                ms=float(c["ms"]),
            )
            for c in calls.values()
        )
        if instrument == sandbox_pb2.INSTRUMENT_PROFILE:
            out.functions.extend(
                sandbox_pb2.FunctionStats(
                    name=str(f[1]), line=int(f[2]), calls=int(f[3]), self_ms=float(f[4])
                )
                for f in functions.values()
            )
        return out

    def _call(self, refresh_available: bool, pool_state_fresh: bool) -> RunResult:
        result = RunResult()
        cap = self._memory_cap()
        if self.memory_used > cap:
            self._collect()  # garbage, mostly: the context a full snapshot replaced
        if self.memory_used > cap:
            # What the script keeps in its globals outgrew the cap (the context shrank):
            # calling in with the heap already over it is what crashes LuaJIT.
            result.error_kind = ErrorKind.ERROR_KIND_MEMORY_LIMIT
            result.error_message = (
                f"not enough memory: the scheduler's Lua heap holds "
                f"{self.memory_used / MiB:.1f} MiB, over its cap of {cap / MiB:.1f} MiB"
            )
            result.retire = True
            return result
        try:
            with self._capped(cap):
                outcome = self._run(refresh_available, pool_state_fresh)
        except Exception as exc:  # memory errors raised outside the script's pcall
            result.error_kind = _exception_kind(exc)
            detail = str(exc)
            if not detail and result.error_kind == ErrorKind.ERROR_KIND_MEMORY_LIMIT:
                detail = "not enough memory"  # Lua 5.4's LuaMemoryError has no message
            result.error_message = f"{type(exc).__name__}: {detail}"
            result.retire = True
            return result
        status, payload, tb, logs, logs_dropped, metrics, metrics_dropped = outcome
        # Text from the sandbox is already valid UTF-8 (lua/text.lua cleans it).
        result.logs = [(str(rec[1]), str(rec[2])) for rec in logs.values()]
        result.logs_dropped = int(logs_dropped)
        result.metrics = [(str(rec[1]), float(rec[2])) for rec in metrics.values()]
        result.metrics_dropped = int(metrics_dropped)
        if status == "ok":
            try:
                result.decision = _decision(payload)
            except UnicodeError:
                result.error_kind = ErrorKind.ERROR_KIND_INVALID_DECISION
                result.error_message = "the decision contains a string that is not valid UTF-8"
        elif status == "refresh":
            result.refresh_requested = True
        else:
            result.error_kind = _STATUS_KINDS[status]
            result.error_message = str(payload)
            result.traceback = str(tb or "")
            result.retire = status in ("violation", "memory")
        if self.memory_used > MEMORY_PRESSURE * cap:
            result.retire = True
            if result.error_kind == ErrorKind.ERROR_KIND_UNSPECIFIED and not result.decision:
                result.error_kind = ErrorKind.ERROR_KIND_MEMORY_LIMIT
        return result


# Job columns always sent, then those sent only when some job sets them (context.lua's
# job_record reads them by name).
_JOB_COLUMNS = (
    "id", "priority", "model_ref", "max_tokens", "seed", "temperature", "created_at",
    "queued_at", "retry_count", "estimated_vram_bytes", "estimated_duration_ms",
)  # fmt: skip
_SPARSE_JOB_COLUMNS = (
    "tenant_id", "session_id", "prompt_hash", "prompt_tokens", "block_counts", "session_worker",
)  # fmt: skip

# A GPU's and a worker's row, in the order context.lua's put_gpus and put_workers read
# them.
_gpu_row = operator.attrgetter(
    "id", "device_name", "compute_capability", "vram_total_bytes", "vram_allocated_bytes",
    "vram_free_bytes", "utilization_percent", "temperature_celsius", "power_draw_watts",
    "supports_fp16", "supports_int8", "supports_tensor_cores", "measured",
)  # fmt: skip
# An unset current_job_id reads as ""; job_started_at, which has no such value, travels
# in its own section.
_worker_row = operator.attrgetter(
    "id", "status", "model_ref", "vram_bytes", "uri", "current_job_id", "jobs_completed",
    "avg_tokens_per_sec", "started_at_ms", "last_used_at_ms", "slots_total", "slots_busy", "api",
)  # fmt: skip

_INSTRUMENT_MODES: dict[int, str] = {
    sandbox_pb2.INSTRUMENT_TRACE: "trace",
    sandbox_pb2.INSTRUMENT_PROFILE: "profile",
    sandbox_pb2.INSTRUMENT_DEBUG: "debug",
}
# A trace keeps the order of this many lines and the details of this many built-in
# calls (every line is still counted): enough for a cycle, bounded for a runaway loop.
MAX_TRACE_STEPS = 10_000
MAX_TRACE_CALLS = 1_000

_STATUS_KINDS = {
    "error": ErrorKind.ERROR_KIND_LUA_ERROR,
    "invalid": ErrorKind.ERROR_KIND_INVALID_DECISION,
    "violation": ErrorKind.ERROR_KIND_SANDBOX_VIOLATION,
    "memory": ErrorKind.ERROR_KIND_MEMORY_LIMIT,
}


def _exception_kind(exc: Exception) -> int:
    if "Memory" in type(exc).__name__:
        return ErrorKind.ERROR_KIND_MEMORY_LIMIT
    return ErrorKind.ERROR_KIND_INTERNAL


def _fields(msg: Any) -> dict[str, Any]:
    """A flat message's scalar fields, including unset ones, by name."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def _checked(value: Any) -> str:
    text = str(value)
    text.encode("utf-8")  # raises UnicodeEncodeError on lone surrogates
    return text


def _decision(record: Any) -> context_pb2.Decision:
    """The Lua record {kind, a, b, c, reason, rule} as a Decision message."""
    kind = str(record[1])
    msg = context_pb2.Decision(reason=_checked(record[5] or ""), rule=_checked(record[6] or ""))
    if kind == "dispatch":
        msg.dispatch.job_id = _checked(record[2])
        msg.dispatch.worker_id = _checked(record[3])
    elif kind == "wait":
        msg.wait.SetInParent()
        if record[2] is not None:
            msg.wait.retry_after_ms = int(record[2])
    elif kind == "start_worker":
        msg.start_worker.pool_id = _checked(record[2])
        msg.start_worker.gpu_id = int(record[3])
        msg.start_worker.model_ref = _checked(record[4])
    elif kind == "evict_worker":
        msg.evict_worker.worker_id = _checked(record[2])
    else:
        msg.batch.SetInParent()
        msg.batch.actions.extend(_decision(item) for item in record[2].values())
    return msg


def now_ns() -> int:
    return time.perf_counter_ns()
