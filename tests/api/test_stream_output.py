"""JobService.StreamOutput and the fields issue 15 added to Submit and JobInfo, on the
servicer with the real service parts behind it (never started: no loop, no pool)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.api.rpc.jobs import WATCHES_PER_CALLER, JobServicer
from orchestrator.config.settings import DecisionLogConfig, LocalPoolConfig, load_config
from orchestrator.domain.identity import Identity, Role
from orchestrator.domain.jobs import SubmitSpec
from orchestrator.service.assembly import assemble
from orchestrator.service.orchestrator import Orchestrator
from orchestrator.support.clock import now_ms
from tests.api.test_errors import Aborted, FakeContext

ACME = Identity("acme-app", Role.TENANT, tenant_id="acme")
GLOBEX = Identity("globex-app", Role.TENANT, tenant_id="globex")


@pytest.fixture
async def o(tmp_path: Path) -> AsyncIterator[Orchestrator]:
    config = dataclasses.replace(
        load_config(None),
        state_dir=str(tmp_path),
        local_pool=LocalPoolConfig(enabled=False),
        decision_log=DecisionLogConfig(enabled=False),
    )
    orchestrator = assemble(config)
    yield orchestrator
    await orchestrator.close()


async def _ran(o: Orchestrator, output: str) -> str:
    """A job of acme's that ran to completion with `output`; its id."""
    job = await o.submit(SubmitSpec(model="llama-8b", prompt="hi", max_tokens=8, tenant_id="acme"))
    (dispatched,) = await o.jobs.dispatch([(job, "w1")], now_ms())
    assert dispatched is not None
    await o.jobs.first_token(job.id, now_ms())
    await o.jobs.complete(job.id, "w1", output, 3, now_ms(), prompt_tokens=2, finish_reason="stop")
    return job.id


async def _stream(servicer: JobServicer, job_id: str) -> list[pb.OutputChunk]:
    request = pb.GetJobRequest(job_id=job_id)
    return [c async for c in servicer.StreamOutput(request, FakeContext())]


async def test_a_tenant_streams_its_jobs_output_ending_with_the_job(o: Orchestrator) -> None:
    job_id = await _ran(o, "a b c")
    servicer = JobServicer(o, caller=lambda: ACME)
    (chunk,) = await _stream(servicer, job_id)
    assert (chunk.text, chunk.tokens, chunk.attempt) == ("a b c", 3, 1)
    job = chunk.job
    assert (job.id, job.state, job.output, job.prompt_tokens, job.finish_reason) == (
        job_id, pb.JOB_STATE_COMPLETED, "a b c", 2, "stop",
    )  # fmt: skip
    assert job.ttft_ms >= 0 and job.tpot_ms >= 0 and job.top_p == 1.0
    assert servicer.watching == {}  # the stream no longer counts


async def test_another_tenants_job_is_not_found(o: Orchestrator) -> None:
    job_id = await _ran(o, "secret")
    with pytest.raises(Aborted) as aborted:
        await _stream(JobServicer(o, caller=lambda: GLOBEX), job_id)
    assert aborted.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(Aborted) as unknown:
        await _stream(JobServicer(o, caller=lambda: GLOBEX), "job-unknown")
    assert str(unknown.value).replace("job-unknown", job_id) == str(aborted.value)


async def test_streams_count_with_watches_against_one_bound(o: Orchestrator) -> None:
    job_id = await _ran(o, "x")
    servicer = JobServicer(o, caller=lambda: ACME)
    servicer.watching[ACME.name] = WATCHES_PER_CALLER  # as many Watch streams open
    with pytest.raises(Aborted) as aborted:
        await _stream(servicer, job_id)
    assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer.watching[ACME.name] -= 1
    assert len(await _stream(servicer, job_id)) == 1
    assert servicer.watching[ACME.name] == WATCHES_PER_CALLER - 1


async def test_a_revoked_key_ends_the_stream(o: Orchestrator) -> None:
    job_id = await _ran(o, "x")
    servicer = JobServicer(o, caller=lambda: ACME, admitted=lambda _: False)
    with pytest.raises(Aborted) as aborted:
        await _stream(servicer, job_id)
    assert aborted.value.code == grpc.StatusCode.UNAUTHENTICATED


async def _submit(o: Orchestrator, **fields: Any) -> pb.JobInfo:
    request = pb.SubmitRequest(model="llama-8b", prompt="hi", max_tokens=4, **fields)
    servicer = JobServicer(o, caller=lambda: ACME)
    return await servicer.Submit(request, FakeContext())


async def test_submit_takes_stop_and_top_p(o: Orchestrator) -> None:
    info = await _submit(o, stop=["\n", "END"], top_p=0.25)
    assert (list(info.stop), info.top_p) == (["\n", "END"], 0.25)
    stored = await o.get(info.id)
    assert (stored.stop, stored.top_p) == (("\n", "END"), 0.25)
    assert (await _submit(o)).top_p == 1.0  # not set: the default, not 0
    for bad in ({"top_p": 0.0}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}):
        with pytest.raises(Aborted) as aborted:
            await _submit(o, **bad)
        assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT
