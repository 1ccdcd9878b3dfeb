"""PoolService as an attacker on loopback sees it (issue 14, findings 2, 3 and 9): a
real server with API keys, real gRPC clients holding one pool's key each."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator._proto import context_pb2
from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc
from orchestrator.api.rpc.pools import heartbeat_from_proto
from orchestrator.config.credentials import token_hash
from orchestrator.domain.context import ProcessInfo
from orchestrator.pools.devworker import generate
from orchestrator.wire.channel import ClientAuth, open_channel
from tests.service_helpers import (
    LLAMA,
    OPERATOR_KEY,
    Running,
    code_of,
    running_service,
    write_config,
)

S = grpc.StatusCode
TOKENS = {"gpu-a": "orch_pool-a-key", "gpu-b": "orch_pool-b-key"}
KEYS = [
    OPERATOR_KEY,
    *({"name": f"{pool}-key", "role": "pool", "pools": [pool], "sha256": token_hash(token)}
      for pool, token in TOKENS.items()),
]  # fmt: skip
L4 = context_pb2.Gpu(id=0, device_name="NVIDIA L4", vram_total_bytes=24 * 2**30)


def heartbeat(pool_id: str, *workers: context_pb2.Worker, **fields: Any) -> pb.PoolHeartbeat:
    return pb.PoolHeartbeat(
        info=context_pb2.PoolInfo(id=pool_id), gpus=fields.get("gpus", [L4]), workers=workers
    )


def worker(worker_id: str, uri: str = "http://127.0.0.1:18999") -> context_pb2.Worker:
    return context_pb2.Worker(id=worker_id, model_ref=LLAMA, status="ready", gpu_ids=[0],
                              vram_bytes=2**30, uri=uri)  # fmt: skip


def test_a_heartbeat_brings_slots_and_api_but_not_their_occupancy() -> None:
    """A pool says how many slots a worker has and the API it speaks; which jobs fill
    them is the core's to know, so the heartbeat's own count and job ids are left out.
    A pool that predates slots sends 0 and "": a one-slot llama.cpp worker."""
    beat = heartbeat("gpu-a")
    beat.info.host_cpu_count = 16
    beat.workers.add(id="vllm", model_ref=LLAMA, status="ready", uri="http://gpu-a:8000",
                     slots_total=64, api="openai", slots_busy=64, active_job_ids=["forged"])  # fmt: skip
    beat.workers.add(id="old", model_ref=LLAMA, uri="http://gpu-a:8001")
    decoded = heartbeat_from_proto(beat)
    assert (decoded.pool_id, decoded.host.cpu_count, len(decoded.gpus)) == ("gpu-a", 16, 1)
    assert decoded.workers == (
        ProcessInfo("vllm", LLAMA, (), 0, "http://gpu-a:8000", "ready", 0, slots=64, api="openai"),
        ProcessInfo("old", LLAMA, (), 0, "http://gpu-a:8001", "starting", 0),
    )


async def refused(call: Awaitable[object], code: grpc.StatusCode, detail: str = "") -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    assert code_of(info.value) == code, info.value.details()
    assert detail in (info.value.details() or "")


async def test_a_pool_key_speaks_only_for_its_pool_its_workers_and_its_host(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, auth={"keys": KEYS}, pools={"max_pools": 2})
    async with running_service(config) as svc:
        port = svc.server.grpc_port
        channels = {p: open_channel(f"127.0.0.1:{port}", ClientAuth(token=t))
                    for p, t in TOKENS.items()}  # fmt: skip
        nobody = aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            a = pb_grpc.PoolServiceStub(channels["gpu-a"])
            b = pb_grpc.PoolServiceStub(channels["gpu-b"])
            register = pb.RegisterPoolRequest
            # Without a key, nobody registers a pool (the interceptor's refusal).
            await refused(pb_grpc.PoolServiceStub(nobody).Register(
                register(pool_id="evil", endpoint="127.0.0.1:9")), S.UNAUTHENTICATED)  # fmt: skip
            # A key speaks for its own pool id only.
            await refused(b.Register(register(pool_id="gpu-a", endpoint="127.0.0.1:9")),
                          S.PERMISSION_DENIED, "may not speak for pool 'gpu-a'")  # fmt: skip
            await refused(b.Heartbeat(heartbeat("gpu-b")), S.NOT_FOUND, "not registered")
            await a.Register(register(pool_id="gpu-a", endpoint="http://127.0.0.1:9200"))
            await b.Register(register(pool_id="gpu-b", endpoint="127.0.0.1:9300"))
            await refused(b.Heartbeat(heartbeat("gpu-a")), S.PERMISSION_DENIED)
            await refused(svc.pools.Register(register(pool_id="gpu-c", endpoint="127.0.0.1:1")),
                          S.RESOURCE_EXHAUSTED, "pools.max_pools")  # fmt: skip
            # Workers serve on the registered host, nowhere else (no SSRF through the core).
            await refused(a.Heartbeat(heartbeat("gpu-a", worker("a-w1", "http://169.254.169.254"))),
                          S.INVALID_ARGUMENT, "workers[0].uri")  # fmt: skip
            # A heartbeat that would overflow ctx.metrics never reaches the cluster state.
            huge = [context_pb2.Gpu(id=i, device_name="x", vram_total_bytes=2**62) for i in (0, 1)]
            await refused(a.Heartbeat(heartbeat("gpu-a", gpus=huge)), S.INVALID_ARGUMENT,
                          "gpus[0].vram_total_bytes")  # fmt: skip
            await a.Heartbeat(heartbeat("gpu-a", worker("a-w1")))
            # No pool takes over another pool's worker, nor the local pool's.
            await refused(b.Heartbeat(heartbeat("gpu-b", worker("a-w1"))), S.PERMISSION_DENIED,
                          "'a-w1' is another pool's worker")  # fmt: skip
            job = await svc.submit(prompt="mine", max_tokens=5, seed=1)
            local_worker = await _local_worker(svc)
            await refused(b.Heartbeat(heartbeat("gpu-b", worker(local_worker))),
                          S.PERMISSION_DENIED)  # fmt: skip
            # Scheduling went on through all of it, on the local worker.
            done = await _finished(svc, job.id)
            assert done.state == pb.JOB_STATE_COMPLETED and done.worker_id == local_worker
            assert done.output == "".join(generate(LLAMA, "mine", 1, 5))
            pools = svc.server.orchestrator.cluster.context().pools
            assert {p.id: [w.id for w in p.workers] for p in pools} == {
                "local": [local_worker],
                "gpu-a": ["a-w1"],
                "gpu-b": [],
            }
        finally:
            for channel in (*channels.values(), nobody):
                await channel.close()


async def _finished(svc: Running, job_id: str) -> pb.JobInfo:
    async with asyncio.timeout(30):
        while True:
            job: pb.JobInfo = await svc.jobs.Get(pb.GetJobRequest(job_id=job_id))
            if job.state in (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED):
                return job
            await asyncio.sleep(0.05)


async def _local_worker(svc: Running) -> str:
    async with asyncio.timeout(30):
        while True:
            local = svc.server.orchestrator.local_pool
            assert local is not None
            if local.workers:
                (worker_id,) = local.workers
                return worker_id
            await asyncio.sleep(0.02)


async def test_healthz_says_degraded_while_cycles_fail_and_ok_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3: every cycle raised while /healthz kept saying ok."""
    async with running_service(write_config(tmp_path)) as svc:
        cluster = svc.server.orchestrator.cluster
        context: Callable[..., object] = cluster.context

        def broken(*args: object, **kwargs: object) -> object:
            raise ValueError("Value out of range: 9223372036854775808")

        monkeypatch.setattr(cluster, "context", broken)
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):
                while (reply := await _healthz(http, svc))[0] == 200:
                    await asyncio.sleep(0.05)
            status, body = reply
            assert status == 503 and body["status"] == "degraded"
            assert "error" not in body  # public: the message stays in the log
            assert body["failed_cycles"] >= 3
            async with asyncio.timeout(10):  # gRPC health follows, within a second
                while await _grpc_health(svc) == health_pb2.HealthCheckResponse.SERVING:
                    await asyncio.sleep(0.1)
            monkeypatch.setattr(cluster, "context", context)
            async with asyncio.timeout(10):
                while (reply := await _healthz(http, svc))[0] != 200:
                    await asyncio.sleep(0.05)
            assert reply == (200, {"status": "ok"})
            async with asyncio.timeout(10):
                while await _grpc_health(svc) != health_pb2.HealthCheckResponse.SERVING:
                    await asyncio.sleep(0.1)
        # And the service schedules again.
        done = await svc.wait_finished((await svc.submit()).id)
        assert done.state == pb.JOB_STATE_COMPLETED


async def _healthz(http: aiohttp.ClientSession, svc: Running) -> tuple[int, dict[str, Any]]:
    async with http.get(svc.http + "/healthz") as response:
        return response.status, await response.json()


async def _grpc_health(svc: Running) -> int:
    stub = health_pb2_grpc.HealthStub(svc.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest())
    return int(reply.status)
