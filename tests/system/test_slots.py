"""Workers with slots, end to end: the real service, one real development worker with
4 slots in each dialect, and 4 jobs that must run on it at the same time.

The GPU is declared just large enough for one worker, so nothing but the slots can
explain four jobs generating at once: each job's first token (which the development
worker sends only once the job holds a slot) comes before any of them finishes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator._proto import orchestrator_pb2 as pb
from tests.service_helpers import running_service, write_config

ONE_WORKER_GPU = {"id": 0, "device_name": "Test GPU", "vram_total_bytes": 8 * 1024**3,
                  "compute_capability": "8.9"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("api", ["llamacpp", "openai"])
async def test_concurrent_jobs_run_on_one_worker_at_the_same_time(tmp_path: Path, api: str) -> None:
    config = write_config(tmp_path, local_pool={
        "gpus": [ONE_WORKER_GPU],
        "worker": {"api": api, "slots": 4, "tokens_per_sec": 40},
    })  # fmt: skip
    async with running_service(config) as svc:
        jobs = await asyncio.gather(
            *(svc.submit(prompt=f"job {i}", max_tokens=24) for i in range(4))
        )
        done = await asyncio.gather(*(svc.wait_finished(job.id, timeout_s=60) for job in jobs))
        assert {job.state for job in done} == {pb.JOB_STATE_COMPLETED}
        assert len({job.worker_id for job in done}) == 1  # the one worker the GPU holds
        first_tokens = [job.created_at_ms + job.ttft_ms for job in done]
        assert all(job.ttft_ms > 0 for job in done)
        assert max(first_tokens) < min(job.finished_at_ms for job in done)
        pool = svc.server.orchestrator.local_pool
        assert pool is not None
        assert [(w.api, w.slots) for w in pool.processes()] == [(api, 4)]
        # While they ran, the scheduler saw the slots fill; now every one is free again.
        (worker,) = svc.server.orchestrator.cluster.context().pools[0].workers
        assert (worker.slots_total, worker.slots_busy, worker.status) == (4, 0, "ready")
