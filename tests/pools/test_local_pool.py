"""A local pool's workers carry their slots and API (docs/ARCHITECTURE.md D27): into the
command that starts them, the cluster state's view of them, and a pool's heartbeat."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from orchestrator.config.settings import (
    DeclaredGpu,
    LocalPoolConfig,
    ServiceConfig,
    WorkerLaunchConfig,
)
from orchestrator.domain.context import HostReading
from orchestrator.pools.hardware import GpuReading
from orchestrator.pools.local_pool import LocalPool, LocalWorker
from orchestrator.pools.pool_manager import PoolManager

GiB = 2**30
BATCHED = WorkerLaunchConfig(
    command=("/bin/sh", "-c", "echo started with {slots} slots; exec sleep 30"),
    api="openai",
    slots=8,
)
POOL = LocalPoolConfig(gpus=(DeclaredGpu(0),), use_nvml=False, worker=BATCHED)


class NoNvml:
    def available(self) -> bool:
        return False

    def read(self) -> list[GpuReading]:
        return []


class IdleHost:
    def read(self) -> HostReading:
        return HostReading(64 * GiB, 60 * GiB, 5.0, 16)


async def test_a_worker_starts_with_the_configured_slots_and_api(tmp_path: Path) -> None:
    """{slots} in the command template is the config's slots; the process the cluster
    state sees has them, and the API the core must speak to it."""
    pool = LocalPool(POOL, NoNvml(), IdleHost(), tmp_path)
    try:
        worker = await pool.start_worker("w1", "llama-8b", 0, 6 * GiB)
        assert (worker.slots, worker.api) == (8, "openai")
        (process,) = pool.processes()
        assert (process.id, process.slots, process.api) == ("w1", 8, "openai")
        log = tmp_path / "worker-w1.log"
        async with asyncio.timeout(10):
            while "started with 8 slots" not in (log.read_text() if log.exists() else ""):
                await asyncio.sleep(0.05)
    finally:
        await pool.evict_worker("w1")
        await pool.close()


def test_a_pool_manager_reports_its_workers_slots_and_api(tmp_path: Path) -> None:
    """The heartbeat says how many slots each worker has and its API; which jobs fill
    them is the core's to know, so the pool reports none busy."""
    config = ServiceConfig(local_pool=POOL, state_dir=str(tmp_path))
    manager = PoolManager(config, "127.0.0.1:1", gpu_probe=NoNvml(), host_probe=IdleHost())
    worker = LocalWorker("w1", "llama-8b", (0,), 6 * GiB, "http://127.0.0.1:18100", 18100,
                         status="ready", slots=8, api="openai")  # fmt: skip
    manager.pool.workers = {"w1": worker, "w2": dataclasses.replace(worker, id="w2", slots=1,
                                                                    api="llamacpp")}  # fmt: skip
    beat = manager.heartbeat()
    reported = [(w.id, w.slots_total, w.api, w.slots_busy, list(w.active_job_ids))
                for w in beat.workers]  # fmt: skip
    assert reported == [("w1", 8, "openai", 0, []), ("w2", 1, "llamacpp", 0, [])]
