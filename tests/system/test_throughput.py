"""A burst through the real service, as the throughput benchmark drives it
(orchestrator/cli/bench_service.py): two development workers of 64 slots, one-token
jobs submitted at once over gRPC and through the OpenAI front door. Every job the
clients were told of completes, exactly once, and the store says so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from orchestrator._proto import orchestrator_pb2 as pb
from tests.service_helpers import Running, running_service, write_config

pytestmark = pytest.mark.slow

BURST = 240  # gRPC submits at once, on one connection (it takes 256 streams at once)
CHATS = 100  # OpenAI requests at once
GPU = {"device_name": "Test GPU", "vram_total_bytes": 8 * 1024**3, "compute_capability": "8.9"}


def completed_once(svc: Running, job_id: str) -> bool:
    store = svc.server.orchestrator.store.store
    states = [state for _, state, _, _ in store.transitions(job_id)]
    return states == ["queued", "dispatched", "running", "completed"]


async def test_a_burst_of_one_token_jobs_all_complete_exactly_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, local_pool={
        "gpus": [{"id": 0, **GPU}, {"id": 1, **GPU}],
        "worker": {"slots": 64, "tokens_per_sec": 2000},
    })  # fmt: skip
    async with running_service(config) as svc:
        completed: set[str] = set()
        progressed = asyncio.Event()

        async def follow() -> None:  # one Watch of every job: a caller may hold 64 streams
            async for event in svc.jobs.Watch(pb.WatchRequest()):
                if event.state == pb.JOB_STATE_COMPLETED:
                    completed.add(event.job_id)
                    progressed.set()

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.1)  # the Watch is open before the first submit
        jobs = await asyncio.gather(*(
            svc.submit(prompt=f"burst {i}", max_tokens=1) for i in range(BURST)
        ))  # fmt: skip
        ids = {job.id for job in jobs}
        assert len(ids) == BURST
        async with asyncio.timeout(120):
            while not ids <= completed:
                progressed.clear()
                await progressed.wait()
        follower.cancel()

        client = openai.AsyncOpenAI(base_url=f"{svc.http}/v1", api_key="none", max_retries=0)
        async with client:
            answers = await asyncio.gather(*(
                client.chat.completions.create(
                    model="llama-8b", messages=[{"role": "user", "content": f"chat {i}"}],
                    max_tokens=1,
                )
                for i in range(CHATS)
            ))  # fmt: skip
        assert {a.choices[0].finish_reason for a in answers} == {"length"}
        chat_ids = {a.id.removeprefix("chatcmpl-") for a in answers}
        assert len(chat_ids) == CHATS

        for job_id in ids | chat_ids:
            job = await svc.server.orchestrator.get(job_id)
            assert (job.state, job.tokens_generated) == ("completed", 1), job_id
            assert job.first_token_at is not None
            assert completed_once(svc, job_id), job_id
