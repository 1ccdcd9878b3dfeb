"""A pool on this host: its GPUs (NVML or declared), its RAM and CPU, and the inference
worker processes it starts from the command template in the config.

The core runs one for its own host; `orchestratord pool-manager` runs one on another
host and reports it through PoolService. Workers are real processes; a worker is
"starting" until its health check answers 200 (`GET /health` for llama.cpp, `GET
/v1/models` for the OpenAI dialect), then "ready", and "failed" if it exits or
never gets healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from orchestrator.config.settings import LocalPoolConfig
from orchestrator.domain.context import Gpu, HostReading, ProcessInfo
from orchestrator.domain.errors import PoolError
from orchestrator.pools.completion import WorkerEndpoint, probe_health, probe_slots
from orchestrator.pools.hardware import GpuProbe, HostProbe
from orchestrator.support.clock import now_ms
from orchestrator.support.files import open_log
from orchestrator.support.log import get_logger

log = get_logger("pool")

HEALTH_POLL_S = 0.05
FAILED_RETENTION_S = 5.0  # how long a failed worker stays visible before it is removed
STOP_GRACE_S = 5.0


@dataclass
class LocalWorker:
    id: str
    model_ref: str
    gpu_ids: tuple[int, ...]
    vram_bytes: int
    uri: str
    port: int
    status: str = "starting"  # the process's state; the core overlays "busy"
    started_at_ms: int = 0
    slots: int = 1  # jobs it runs at once: the config's, until the server says otherwise
    api: str = "llamacpp"  # the dialect it speaks (WORKER_APIS)
    process: asyncio.subprocess.Process | None = None
    detail: str = ""
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class LocalPool:
    def __init__(
        self,
        config: LocalPoolConfig,
        gpu_probe: GpuProbe,
        host_probe: HostProbe,
        state_dir: Path,
        *,
        cache_ms: int = 500,
    ) -> None:
        self.config = config
        self.id = config.id
        self.gpu_probe = gpu_probe
        self.host_probe = host_probe
        self.state_dir = state_dir
        self.cache_ms = cache_ms
        self.workers: dict[str, LocalWorker] = {}
        self.measured = gpu_probe.available()
        self._gpus: tuple[Gpu, ...] = ()
        self._host = HostReading()
        self._read_at = 0.0
        self._ports_in_use: set[int] = set()
        self.version = 0  # bumped on every change the core must see
        self.on_change: list[asyncio.Event] = []
        if not self.measured and not config.gpus:
            log.warning("pool.no_gpus", pool=self.id, reason="no NVML and no declared GPUs")

    @property
    def gpu_source(self) -> str:
        return "nvml" if self.measured else "declared"

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    def processes(self) -> list[ProcessInfo]:
        """The worker processes as the cluster state sees them (the core overlays "busy")."""
        return [
            ProcessInfo(
                w.id,
                w.model_ref,
                w.gpu_ids,
                w.vram_bytes,
                w.uri,
                w.status,
                w.started_at_ms,
                slots=w.slots,
                api=w.api,
            )
            for w in self.workers.values()
        ]

    # ------------------------------------------------------------------ readings
    def read(self, *, force: bool = False) -> tuple[tuple[Gpu, ...], HostReading]:
        """GPUs and host, cached for the heartbeat interval unless `force`."""
        now = time.monotonic()
        if force or now - self._read_at >= self.cache_ms / 1000 or not self._read_at:
            self._gpus = self._read_gpus()
            self._host = self.host_probe.read()
            self._read_at = now
        return self._gpus, self._host

    def _read_gpus(self) -> tuple[Gpu, ...]:
        if self.measured:
            return tuple(
                Gpu(
                    id=r.index,
                    device_name=r.name,
                    compute_capability=r.compute_capability,
                    vram_total_bytes=r.memory_total,
                    vram_allocated_bytes=r.memory_used,
                    vram_free_bytes=r.memory_free,
                    utilization_percent=r.utilization_percent,
                    temperature_celsius=r.temperature_celsius,
                    power_draw_watts=r.power_watts,
                    measured=True,
                )
                for r in self.gpu_probe.read()
            )
        return tuple(self._declared_gpu(g.id) for g in self.config.gpus)

    def _declared_gpu(self, gpu_id: int) -> Gpu:
        """A declared GPU: VRAM in use is what this pool's workers were given."""
        spec = next(g for g in self.config.gpus if g.id == gpu_id)
        allocated = sum(w.vram_bytes for w in self.workers.values() if gpu_id in w.gpu_ids)
        busy = sum(1 for w in self.workers.values() if gpu_id in w.gpu_ids)
        return Gpu(
            id=spec.id,
            device_name=spec.device_name,
            compute_capability=spec.compute_capability,
            vram_total_bytes=spec.vram_total_bytes,
            vram_allocated_bytes=allocated,
            vram_free_bytes=max(0, spec.vram_total_bytes - allocated),
            utilization_percent=min(100.0, 50.0 * busy),
            supports_fp16=spec.supports_fp16,
            supports_int8=spec.supports_int8,
            supports_tensor_cores=spec.supports_tensor_cores,
            measured=False,
        )

    def _changed(self) -> None:
        self.version += 1
        self._read_at = 0.0  # VRAM accounting moved: re-read
        for event in self.on_change:
            event.set()

    # ------------------------------------------------------------------ workers
    async def start_worker(
        self, worker_id: str, model_ref: str, gpu_id: int, vram_bytes: int
    ) -> LocalWorker:
        """Spawn the worker process; it becomes ready in the background."""
        launch = self.config.worker
        port = self._free_port()
        values = {
            "python": sys.executable,
            "host": launch.host,
            "port": str(port),
            "model_ref": model_ref,
            "model_file": launch.model_files.get(model_ref, model_ref),
            "gpu_id": str(gpu_id),
            "worker_id": worker_id,
            "tokens_per_sec": f"{launch.tokens_per_sec:g}",
            "slots": str(launch.slots),
        }
        try:
            argv = [part.format(**values) for part in launch.command]
        except (KeyError, IndexError) as exc:
            raise PoolError(f"worker command template: unknown placeholder {exc}") from None
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CUDA_VISIBLE_DEVICES": str(gpu_id),
            **launch.env,
        }
        worker = LocalWorker(
            id=worker_id,
            model_ref=model_ref,
            gpu_ids=(gpu_id,),
            vram_bytes=vram_bytes,
            uri=f"http://{launch.host}:{port}",
            port=port,
            started_at_ms=now_ms(),
            slots=launch.slots,
            api=launch.api,
        )
        try:
            log_fd = open_log(self.state_dir / f"worker-{worker_id}.log", append=True)
        except OSError as exc:
            self._ports_in_use.discard(port)
            raise PoolError(f"worker log: {exc}") from None
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        except OSError as exc:
            self._ports_in_use.discard(port)
            raise PoolError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        finally:
            os.close(log_fd)  # the worker has its own copy
        self.workers[worker_id] = worker
        self._record_pids()
        worker.watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        self._changed()
        log.info(
            "pool.worker_starting",
            pool=self.id,
            worker=worker_id,
            model=model_ref,
            gpu=gpu_id,
            pid=worker.process.pid,
            uri=worker.uri,
        )
        return worker

    async def _watch(self, worker: LocalWorker) -> None:
        """Starting -> ready once its dialect's health check answers (with the slots the
        server reports, if asked); -> failed if the process exits."""
        assert worker.process is not None
        deadline = time.monotonic() + self.config.worker.startup_timeout_ms / 1000
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while worker.status == "starting":
                if worker.process.returncode is not None:
                    self._fail(worker, f"exited with status {worker.process.returncode}")
                    break
                if time.monotonic() > deadline:
                    self._fail(worker, "not healthy before the startup timeout")
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                    break
                endpoint = WorkerEndpoint(worker.uri, worker.api)
                if await probe_health(session, endpoint):
                    if self.config.worker.slots_from_server:
                        worker.slots = await probe_slots(session, endpoint) or worker.slots
                    worker.status = "ready"
                    self._changed()
                    log.info(
                        "pool.worker_ready",
                        pool=self.id,
                        worker=worker.id,
                        startup_ms=now_ms() - worker.started_at_ms,
                        api=worker.api,
                        slots=worker.slots,
                    )
                    break
                await asyncio.sleep(HEALTH_POLL_S)
        code = await worker.process.wait()
        if self.workers.get(worker.id) is worker and worker.status != "failed":
            self._fail(worker, f"exited with status {code}")

    def _fail(self, worker: LocalWorker, detail: str) -> None:
        worker.status = "failed"
        worker.detail = detail
        self._changed()
        log.warning("pool.worker_failed", pool=self.id, worker=worker.id, detail=detail)
        asyncio.get_running_loop().call_later(FAILED_RETENTION_S, self._forget, worker)

    def _forget(self, worker: LocalWorker) -> None:
        """A failed worker is shown as failed for a while, then removed: left in place it
        would hold its GPU's VRAM for ever, and once every slot held a dead worker no new
        one could start (found by the soak: all 16 failed, nothing scheduled again)."""
        if self.workers.get(worker.id) is not worker or worker.status != "failed":
            return
        self._remove(worker.id)
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # stopped or wedged, not exited
                worker.process.kill()
        log.info("pool.worker_removed", pool=self.id, worker=worker.id, detail=worker.detail)

    async def evict_worker(self, worker_id: str) -> None:
        """Stop the worker: SIGTERM, then SIGKILL after a grace period."""
        worker = self._remove(worker_id)
        if worker is None:
            return
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await worker.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        if worker.watcher is not None:
            worker.watcher.cancel()
        log.info("pool.worker_evicted", pool=self.id, worker=worker_id)

    def _remove(self, worker_id: str) -> LocalWorker | None:
        """Take the worker out of the pool: its VRAM and port are free from now on."""
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            self._ports_in_use.discard(worker.port)
            self._record_pids()
            self._changed()
        return worker

    def mark_failed(self, worker_id: str, detail: str) -> None:
        """The core saw the worker fail (its API stopped answering)."""
        worker = self.workers.get(worker_id)
        if worker is not None and worker.status != "failed":
            self._fail(worker, detail)

    async def close(self) -> None:
        await asyncio.gather(*(self.evict_worker(w) for w in list(self.workers)))

    def _free_port(self) -> int:
        low, high = self.config.worker.port_range[0], self.config.worker.port_range[-1]
        for port in range(low, high + 1):
            if port in self._ports_in_use:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind((self.config.worker.host, port))
                except OSError:
                    continue
            self._ports_in_use.add(port)
            return port
        raise PoolError(f"no free port in {low}..{high} for a new worker")

    # ------------------------------------------------------------------ leftovers
    @property
    def _pid_file(self) -> Path:
        return self.state_dir / f"pool-{self.id}-workers.json"

    def _record_pids(self) -> None:
        # (pid, start time): a pid alone could have been reused by the time we read it.
        entries = {}
        for w in self.workers.values():
            if w.process is not None:
                with contextlib.suppress(psutil.Error):
                    entries[w.id] = [w.process.pid, psutil.Process(w.process.pid).create_time()]
        # Written as a log is (support/files.py): never through a link planted in the
        # state directory, since kill_leftovers trusts what it reads back.
        with os.fdopen(open_log(self._pid_file), "w") as out:
            out.write(json.dumps(entries))

    def kill_leftovers(self) -> int:
        """Kill workers a previous run of this pool left behind (it was killed itself)."""
        try:
            entries = json.loads(self._pid_file.read_text())
        except (OSError, ValueError):
            return 0
        killed = 0
        for pid, created in entries.values():
            try:
                if psutil.Process(int(pid)).create_time() != created:
                    continue
                os.killpg(int(pid), signal.SIGKILL)
                killed += 1
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        self._pid_file.unlink(missing_ok=True)
        return killed
