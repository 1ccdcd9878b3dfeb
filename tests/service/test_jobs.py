"""Jobs as the service runs them, scoped and bounded (security issue 14): the real
parts from `assemble` (SQLite in a temporary directory, the cluster state, the job
state machine), never started: no scheduling loop, no pool, no sandbox."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.settings import (
    DecisionLogConfig,
    LocalPoolConfig,
    ServiceConfig,
    load_config,
)
from orchestrator.domain.context import QueueConfig, RetryConfig
from orchestrator.domain.errors import (
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
    RateLimitedError,
)
from orchestrator.domain.jobs import JobRecord, JobState, SubmitLimits, SubmitSpec, TenantLimits
from orchestrator.service.assembly import assemble
from orchestrator.service.metrics import MAX_TENANT_LABELS
from orchestrator.service.orchestrator import Orchestrator
from orchestrator.state.cluster import last_midnight_utc_ms
from orchestrator.state.store import JobStore
from orchestrator.support.clock import now_ms

Factory = Callable[..., Orchestrator]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Factory]:
    """Builds the service over `tmp_path` with config fields replaced; closes it after."""
    built: list[Orchestrator] = []

    def build(**fields: Any) -> Orchestrator:
        config = dataclasses.replace(
            load_config(None),  # the embedded default, for its catalog
            state_dir=str(tmp_path / "state"),
            local_pool=LocalPoolConfig(enabled=False),
            decision_log=DecisionLogConfig(enabled=False),
            **fields,
        )
        built.append(assemble(config))
        return built[-1]

    yield build
    for o in built:
        await o.close()


def spec(tenant: str = "", prompt: str = "hello", **fields: Any) -> SubmitSpec:
    return SubmitSpec(
        model="llama-8b", prompt=prompt, max_tokens=fields.pop("max_tokens", 8),
        tenant_id=tenant, **fields,
    )  # fmt: skip


def limited(o: Orchestrator, limit: str) -> float:
    value = o.metrics.registry.get_sample_value("orchestrator_jobs_limited_total", {"limit": limit})
    return value or 0.0


# ---------------------------------------------------------------------- scoping
async def test_another_tenants_job_is_not_found_exactly_like_an_unknown_one(
    service: Factory,
) -> None:
    o = service()
    job = await o.submit(spec("acme"))
    plain = await o.submit(spec(""))
    with pytest.raises(NotFoundError) as unknown:
        await o.get("job-unknown", tenant="globex")
    for call in (o.get, o.cancel):
        with pytest.raises(NotFoundError) as other:
            await call(job.id, tenant="globex")
        assert str(other.value) == str(unknown.value).replace("job-unknown", job.id)
        with pytest.raises(NotFoundError):
            await call(plain.id, tenant="globex")  # nor a job without a tenant
    with pytest.raises(NotFoundError) as watched:
        async with o.subscribe(job.id, tenant="globex"):
            pass
    assert str(watched.value) == f"job {job.id!r} not found"
    assert (await o.get(job.id)).state == JobState.QUEUED  # the cancel did nothing
    assert (await o.get(job.id, tenant="acme")).id == job.id
    assert (await o.get(plain.id, tenant="")).id == plain.id  # "": jobs without a tenant
    with pytest.raises(NotFoundError):
        await o.get(job.id, tenant="")
    assert (await o.cancel(job.id, tenant="acme")).state == JobState.CANCELLED


async def test_a_tenants_watch_sees_only_its_own_jobs(service: Factory) -> None:
    o = service()
    theirs = await o.submit(spec("globex"))
    async with (
        o.subscribe(None, tenant="acme") as everything,
        o.events.subscribe(theirs.id, tenant="acme") as one,
        o.subscribe(None) as operator,
    ):
        mine = await o.submit(spec("acme"))
        await o.submit(spec("globex"))
        await o.cancel(theirs.id)
        assert [everything.get_nowait().record.id] == [mine.id] and everything.empty()
        assert one.empty()  # the job is known, just not the watcher's
        assert operator.qsize() == 3


async def test_request_id_is_per_tenant(service: Factory) -> None:
    """Tenant B reusing (or claiming in advance) A's request_id gets a job of its own."""
    o = service()
    claimed = await o.submit(spec("mallory", request_id="req-1", prompt="claimed"))
    victim = await o.submit(spec("acme", request_id="req-1", prompt="mine"))
    assert victim.id != claimed.id and victim.tenant_id == "acme"
    again = await o.submit(spec("acme", request_id="req-1", prompt="something else"))
    assert again.id == victim.id and again.prompt == "mine"  # idempotent within a tenant
    plain = await o.submit(spec("", request_id="req-1"))
    assert plain.id not in (victim.id, claimed.id)


# ---------------------------------------------------------------------- bounds
async def test_a_tenants_queued_jobs_are_bounded(service: Factory) -> None:
    o = service(tenants={"acme": {"limits": {"max_queued_jobs": 2}}})
    first = await o.submit(spec("acme"))
    await o.submit(spec("acme"))
    with pytest.raises(
        RateLimitedError, match=r"has 2 jobs queued, its max_queued_jobs \(2\); retry when"
    ):
        await o.submit(spec("acme"))
    assert limited(o, "tenant_queued_jobs") == 1
    await o.submit(spec("globex"))  # another tenant's share is its own
    await o.cancel(first.id)
    await o.submit(spec("acme"))  # a queued job left: room again


async def test_the_default_share_applies_to_every_tenant_not_to_jobs_without_one(
    service: Factory,
) -> None:
    """Jobs without a tenant (home, lab) have the queue's bounds only: a share would
    cap a service without tenants below its queue.capacity (found in review)."""
    o = service(limits=SubmitLimits(per_tenant=TenantLimits(max_queued_jobs=1)))
    await o.submit(spec("acme"))
    with pytest.raises(RateLimitedError, match=r"tenant 'acme' has 1 jobs queued"):
        await o.submit(spec("acme"))
    await o.submit(spec("globex"))
    for _ in range(3):
        await o.submit(spec(""))


async def test_a_tenants_queued_prompt_bytes_are_bounded(service: Factory) -> None:
    o = service(tenants={"acme": {"limits": {"max_queued_prompt_bytes": 10}}})
    await o.submit(spec("acme", prompt="x" * 6))
    with pytest.raises(RateLimitedError, match=r"has 6 prompt bytes queued.* \(10\)"):
        await o.submit(spec("acme", prompt="é" * 3))  # 6 bytes in UTF-8
    with pytest.raises(
        InvalidRequestError,
        match=r"11 bytes exceed the max_queued_prompt_bytes of tenant 'acme' \(10\)",
    ):
        await o.submit(spec("acme", prompt="x" * 11))  # could never fit
    await o.submit(spec("acme", prompt="x" * 4))
    assert limited(o, "tenant_queued_prompt_bytes") == 2


async def test_queued_prompt_bytes_of_all_tenants_are_bounded(service: Factory) -> None:
    o = service(limits=SubmitLimits(max_queued_prompt_bytes=10))
    await o.submit(spec("acme", prompt="x" * 6))
    with pytest.raises(QueueFullError, match="queued prompts hold 6 bytes"):
        await o.submit(spec("globex", prompt="x" * 6))
    assert limited(o, "queued_prompt_bytes") == 1


async def test_the_queue_capacity_counts_every_tenant(service: Factory) -> None:
    o = service(queue=QueueConfig(capacity=2))
    await o.submit(spec("acme"))
    await o.submit(spec("globex"))
    with pytest.raises(QueueFullError, match=r"the queue is full \(2 jobs\)"):
        await o.submit(spec(""))
    assert limited(o, "queue_capacity") == 1


async def test_requests_per_minute_refill_and_say_when_to_retry(service: Factory) -> None:
    o = service(tenants={"acme": {"limits": {"requests_per_minute": 2}}})
    clock = [1000.0]
    o.jobs.admission.clock = lambda: clock[0]
    await o.submit(spec("acme"))
    await o.submit(spec("acme"))  # a minute's worth may come at once
    with pytest.raises(RateLimitedError, match=r"requests_per_minute \(2\); retry in 30.0 s"):
        await o.submit(spec("acme"))
    await o.submit(spec("globex"))  # not limited: the default is unlimited
    clock[0] += 30
    await o.submit(spec("acme"))
    assert limited(o, "tenant_requests_per_minute") == 1


async def test_tokens_per_minute_count_max_tokens_and_the_prompt(service: Factory) -> None:
    o = service(limits=SubmitLimits(per_tenant=TenantLimits(tokens_per_minute=120)))
    clock = [1000.0]
    o.jobs.admission.clock = lambda: clock[0]
    await o.submit(spec("acme", prompt="x" * 200, max_tokens=50))  # 50 + 200 / 4 = 100
    with pytest.raises(RateLimitedError, match=r"tokens_per_minute \(120\); retry in 5.0 s"):
        await o.submit(spec("acme", prompt="x" * 4, max_tokens=29))  # 30: 10 short
    assert limited(o, "tenant_tokens_per_minute") == 1
    with pytest.raises(InvalidRequestError, match=r"121 tokens .* never admitted"):
        await o.submit(spec("globex", prompt="x" * 4, max_tokens=120))
    clock[0] += 5
    await o.submit(spec("acme", prompt="x" * 4, max_tokens=29))


async def test_a_refused_rate_spends_nothing(service: Factory) -> None:
    """Both buckets or neither: a submit refused for tokens keeps its request."""
    o = service(tenants={"acme": {"limits": {"requests_per_minute": 2, "tokens_per_minute": 20}}})
    o.jobs.admission.clock = lambda: 1000.0
    await o.submit(spec("acme", max_tokens=15))
    with pytest.raises(RateLimitedError, match="tokens_per_minute"):
        await o.submit(spec("acme", max_tokens=15))
    await o.submit(spec("acme", max_tokens=1))  # the refused one took no request


async def test_concurrent_submits_cannot_overshoot_a_bound(service: Factory) -> None:
    """The store is written on another thread: submits admitted meanwhile count too."""
    o = service(tenants={"acme": {"limits": {"max_queued_jobs": 3}}})
    results = await asyncio.gather(
        *(o.submit(spec("acme", prompt=f"p{i}")) for i in range(8)), return_exceptions=True
    )
    assert sum(isinstance(r, JobRecord) for r in results) == 3
    assert all(isinstance(r, JobRecord | RateLimitedError) for r in results)
    assert o.cluster.tenant_queued("acme") == (3, 6)


async def test_tenant_limits_are_reloaded(service: Factory) -> None:
    o = service(tenants={"acme": {"limits": {"max_queued_jobs": 1}}})
    await o.submit(spec("acme"))
    o.reload_catalog(o.catalog, {})  # the tenants file no longer limits acme
    await o.submit(spec("acme"))
    assert "acme" not in o.tenant_quotas


def test_the_service_queue_is_bounded_by_default() -> None:
    """-1 (unbounded) stays the domain's default, as in the runtime spec's examples; the
    service's default and the embedded config are bounded."""
    assert QueueConfig().capacity == -1
    assert ServiceConfig().queue.capacity == load_config(None).queue.capacity == 100_000
    assert load_config(None).context_config().queue.capacity == 100_000


# ---------------------------------------------------------------------- restarts
async def test_todays_tokens_survive_a_restart(service: Factory, tmp_path: Path) -> None:
    """Daily token quotas were counted in memory only: a restart reset them."""
    now = now_ms()
    store = JobStore(tmp_path / "state" / "jobs.sqlite3")
    for job_id, tenant, finished, tokens in (
        ("today", "acme", now, 300),
        ("today-too", "acme", now, 200),
        ("yesterday", "acme", last_midnight_utc_ms(now) - 1, 1000),
        ("other", "globex", now, 7),
    ):
        store.insert(
            JobRecord(job_id, "llama-8b", "p", "sha256:0", "batch", 8, 0.0, 1, 1, tenant_id=tenant)
        )
        store.db.execute(
            "UPDATE jobs SET state = 'completed', finished_at = ?, tokens_generated = ? "
            "WHERE id = ?",
            (finished, tokens, job_id),
        )
    store.close()
    o = service(tenants={"acme": {"quota_tokens_daily": 400}})
    await o.jobs.recover()
    (acme,) = o.cluster.tenants(now_ms())
    assert (acme.tokens_used_today, acme.quota_exceeded) == (500, True)
    assert o.cluster.tokens_today == {"acme": 500, "globex": 7}


async def test_a_retried_submit_is_not_charged_again(service: Factory) -> None:
    """Resubmitting an accepted job (same request_id) returns it, without spending the
    tenant's rate again (found in review: it was refused with 429)."""
    o = service(tenants={"acme": {"limits": {"requests_per_minute": 1}}})
    first = await o.submit(dataclasses.replace(spec("acme"), request_id="r-1"))
    again = await o.submit(dataclasses.replace(spec("acme"), request_id="r-1"))
    assert again.id == first.id
    with pytest.raises(RateLimitedError, match="requests_per_minute"):
        await o.submit(dataclasses.replace(spec("acme"), request_id="r-2"))


# ---------------------------------------------------------------------- output and metrics
async def _dispatched(o: Orchestrator, job: JobRecord) -> JobRecord:
    (dispatched,) = await o.jobs.dispatch([(job, "w1")], now_ms())
    assert dispatched is not None
    return dispatched


async def test_a_job_that_ended_before_anyone_followed_is_read_from_the_store(
    service: Factory,
) -> None:
    o = service()
    job = await _dispatched(o, await o.submit(spec("acme")))
    await o.jobs.complete(job.id, "w1", "the output", 2, now_ms(), prompt_tokens=3)
    chunks = [c async for c in o.stream_output(job.id, tenant="acme")]
    assert [(c.text, c.tokens, c.attempt) for c in chunks] == [("the output", 2, 1)]
    final = chunks[0].final
    assert final is not None and (final.state, final.prompt_tokens) == (JobState.COMPLETED, 3)
    with pytest.raises(NotFoundError):  # another tenant's job, as Get
        [c async for c in o.stream_output(job.id, tenant="globex")]
    assert len(o.outputs) == 0


async def test_a_follower_sees_the_output_as_it_comes_until_the_job_ends(
    service: Factory,
) -> None:
    o = service()
    job = await _dispatched(o, await o.submit(spec()))
    o.outputs.begin(job.id, job.attempts)  # what JobRunner.start does
    o.outputs.append(job.id, "he", 1)
    chunks = o.stream_output(job.id)
    assert (await anext(chunks)).text == "he"
    o.outputs.append(job.id, "llo", 2)
    assert (await anext(chunks)).text == "llo"
    await o.jobs.complete(job.id, "w1", "hello", 2, now_ms())
    last = await anext(chunks)
    assert last.final is not None and last.final.output == "hello"
    assert [c async for c in chunks] == []
    assert len(o.outputs) == 0


def sample(o: Orchestrator, name: str, **labels: str) -> float:
    return o.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_ttft_and_tpot_are_the_completing_attempts_on_the_record_and_in_metrics(
    service: Factory,
) -> None:
    """One definition: a retried job's TTFT runs from submit to the first token of the
    attempt that completed, and /metrics observes it, and TPOT, from the completed
    record (before, the histogram had the first attempt's and the record the last's)."""
    o = service(retry=RetryConfig(enabled=True, max_attempts=3, initial_delay_ms=0))
    job = await _dispatched(o, await o.submit(spec("acme", prompt="x" * 40)))
    labels = {"model": job.model_ref, "priority": job.priority, "tenant": "acme"}
    await o.jobs.first_token(job.id, now_ms())
    lost = await o.get(job.id)
    assert lost.first_token_at is not None
    assert sample(o, "orchestrator_job_ttft_seconds_count", **labels) == 0  # not yet
    await o.jobs.retry_or_fail(lost, "worker went away", now_ms())
    assert (await o.get(job.id)).ttft_ms is None  # the failed attempt's first token is void
    await asyncio.sleep(0.01)  # so that the next attempt's first token is later
    again = await _dispatched(o, await o.get(job.id))
    await o.jobs.first_token(again.id, now_ms())
    await o.jobs.complete(job.id, "w1", "out", 5, now_ms(), finish_reason="length")
    done = await o.get(job.id)
    assert done.first_token_at is not None and done.first_token_at > lost.first_token_at
    assert done.ttft_ms is not None and done.tpot_ms is not None
    assert (done.attempts, done.finish_reason) == (2, "length")
    assert sample(o, "orchestrator_job_ttft_seconds_count", **labels) == 1
    assert sample(o, "orchestrator_job_ttft_seconds_sum", **labels) == done.ttft_ms / 1000
    assert sample(o, "orchestrator_job_tpot_seconds_count", **labels) == 1
    assert sample(o, "orchestrator_job_tpot_seconds_sum", **labels) == pytest.approx(
        done.tpot_ms / 1000
    )
    assert sample(o, "orchestrator_tokens_out_total", tenant="acme") == 5
    # The worker did not count the prompt: its bytes / 4.
    assert sample(o, "orchestrator_tokens_in_total", tenant="acme") == 10
    plain = await _dispatched(o, await o.submit(spec()))
    await o.jobs.complete(plain.id, "w1", "o", 1, now_ms(), prompt_tokens=7)
    assert sample(o, "orchestrator_tokens_in_total", tenant="none") == 7
    # One token, no first token: no time per output token to speak of.
    assert sample(o, "orchestrator_job_tpot_seconds_count", **{**labels, "tenant": "none"}) == 0


def test_client_chosen_tenant_labels_are_bounded(service: Factory) -> None:
    metrics = service().jobs.metrics
    names = [metrics.tenant_label(f"t{i}", known=False) for i in range(MAX_TENANT_LABELS + 5)]
    assert names[:MAX_TENANT_LABELS] == [f"t{i}" for i in range(MAX_TENANT_LABELS)]
    assert set(names[MAX_TENANT_LABELS:]) == {"other"}
    assert metrics.tenant_label("t3", known=False) == "t3"  # still labelled by name
    assert metrics.tenant_label("", known=False) == "none"
    assert metrics.tenant_label("acme", known=True) == "acme"  # from the tenants file
