"""The decision validator: pure, on hand-made contexts."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.domain.decision import Batch, Dispatch, EvictWorker, StartWorker, Wait
from orchestrator.domain.samples import LLAMA_8B, MISTRAL_7B, GiB, sample_context
from orchestrator.scheduling.validation import validate
from tests.slotted import slotted_context

CTX = sample_context()


def reasons(decision: object, ctx: object = CTX) -> list[str]:
    return [r.reason for r in validate(decision, ctx).rejections]  # type: ignore[arg-type]


def test_valid_single_actions_pass() -> None:
    """Well-formed actions on the sample context are accepted."""
    assert reasons(Dispatch("job-1", "worker-1")) == []
    assert reasons(Wait(retry_after_ms=1000)) == []
    assert reasons(StartWorker("pool-1", 2, MISTRAL_7B)) == []
    assert reasons(StartWorker("pool-2", 0, "mistral-7b")) == []  # aliases resolve
    assert reasons(EvictWorker("worker-3")) == []


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        (Dispatch("job-404", "worker-1"), "unknown_job"),
        (Dispatch("job-1", "worker-404"), "unknown_worker"),
        (Dispatch("job-2", "worker-2"), "worker_not_ready"),
        (Dispatch("job-1", "worker-3"), "model_mismatch"),
        (StartWorker("pool-9", 0, LLAMA_8B), "unknown_pool"),
        (StartWorker("pool-1", 7, LLAMA_8B), "unknown_gpu"),
        (StartWorker("pool-1", 0, "gpt-5"), "unknown_model"),
        (StartWorker("pool-1", 0, "llama-70b"), "insufficient_vram"),
        (StartWorker("pool-1", 1, "llama-13b"), "insufficient_vram"),  # 11 GiB free, needs 13
        (EvictWorker("worker-2"), "worker_busy"),
        (EvictWorker("worker-404"), "unknown_worker"),
        (Wait(retry_after_ms=-5), "invalid_retry_after"),
        (Batch((Batch(()),)), "nested_batch"),
    ],
)
def test_each_rule_rejects_with_its_reason(decision: object, reason: str) -> None:
    """Every check produces its own machine-readable reason."""
    assert reasons(decision) == [reason]


def test_batch_is_validated_in_order_against_its_own_effects() -> None:
    """A job or worker used twice in one batch, or VRAM promised twice, is rejected at its index."""
    verdict = validate(
        Batch(
            (
                Dispatch("job-1", "worker-1"),
                Dispatch("job-1", "worker-4"),
                Dispatch("job-3", "worker-1"),
                EvictWorker("worker-1"),
            )
        ),
        CTX,
    )
    assert [(r.index, r.reason) for r in verdict.rejections] == [
        (1, "job_already_dispatched"),
        (2, "worker_not_ready"),
        (3, "worker_busy"),
    ]
    # pool-2 GPU 0 has 32 GiB free: four 7 GiB workers fit, the fifth does not.
    starts = Batch(tuple(StartWorker("pool-2", 0, MISTRAL_7B) for _ in range(5)))
    assert [(r.index, r.reason) for r in validate(starts, CTX).rejections] == [
        (4, "insufficient_vram")
    ]


def test_batch_size_is_capped() -> None:
    """A batch over max_batch_actions is refused whole."""
    big = Batch(tuple(Wait() for _ in range(10)))
    assert [r.reason for r in validate(big, CTX, max_batch_actions=5).rejections] == [
        "too_many_actions"
    ]


def test_pool_offline_refuses_dispatch_and_start() -> None:
    """Nothing is sent to a pool that is offline."""
    offline = dataclasses.replace(
        CTX, pools=(dataclasses.replace(CTX.pools[0], status="offline"), CTX.pools[1])
    )
    assert reasons(Dispatch("job-1", "worker-1"), offline) == ["pool_offline"]
    assert reasons(StartWorker("pool-1", 2, MISTRAL_7B), offline) == ["pool_offline"]


def test_quotas_apply_in_platform_mode_and_accumulate_within_a_batch() -> None:
    """tenant-2 may run one job at a time; tenant-1 may run ten; an unknown tenant none."""
    ctx = sample_context(platform_mode=True)
    assert reasons(Dispatch("job-2", "worker-4"), ctx) == ["model_mismatch"]
    job5 = ctx.jobs_by_id["job-5"]
    assert job5.tenant_id == "tenant-2"
    free_tenant2 = dataclasses.replace(
        ctx.tenants[1], concurrent_jobs=0, vram_used_bytes=0, tokens_used_today=0
    )
    ctx2 = dataclasses.replace(ctx, tenants=(ctx.tenants[0], free_tenant2))
    # With tenant-2 idle, one of its jobs may go, a second in the same batch may not.
    workers = dataclasses.replace(
        ctx2.pools[1],
        workers=(
            *ctx2.pools[1].workers,
            dataclasses.replace(
                ctx2.pools[1].workers[0], id="worker-m1", model_ref=MISTRAL_7B, vram_bytes=8 * GiB
            ),
            dataclasses.replace(
                ctx2.pools[1].workers[0], id="worker-m2", model_ref=MISTRAL_7B, vram_bytes=8 * GiB
            ),
        ),
    )
    ctx3 = dataclasses.replace(ctx2, pools=(ctx2.pools[0], workers))
    extra_job = dataclasses.replace(job5, id="job-6")
    ctx3 = dataclasses.replace(ctx3, queue=(*ctx3.queue, extra_job))
    verdict = validate(
        Batch((Dispatch("job-5", "worker-m1"), Dispatch("job-6", "worker-m2"))), ctx3
    )
    assert [(r.index, r.reason, r.detail) for r in verdict.rejections] == [
        (1, "quota_exceeded", "tenant 'tenant-2': concurrent_jobs")
    ]
    stranger = dataclasses.replace(ctx.jobs_by_id["job-1"], id="job-x", tenant_id="tenant-x")
    ctx4 = dataclasses.replace(ctx, queue=(*ctx.queue, stranger))
    assert reasons(Dispatch("job-x", "worker-1"), ctx4) == ["unknown_tenant"]


def test_rejection_text_names_the_action() -> None:
    """The summary says which action failed, why, and with which ids."""
    verdict = validate(Dispatch("job-404", "worker-1"), CTX)
    assert not verdict.ok
    assert (
        verdict.summary() == "action #0 (dispatch): unknown_job: job 'job-404' is not in the queue"
    )


# ---------------------------------------------------------------- slots (D27)
def test_a_worker_takes_as_many_jobs_as_it_has_free_slots() -> None:
    """worker-1 has 3 of its 4 slots free: three dispatches to it in one batch pass, the
    fourth is refused, and says how many of its slots are busy."""
    ctx = slotted_context(slots=4, busy={"worker-1": 1}, extra_jobs=4)
    jobs = ["job-1", "extra-0", "extra-1", "extra-2"]
    verdict = validate(Batch(tuple(Dispatch(job, "worker-1") for job in jobs)), ctx)
    assert [(r.index, r.reason, r.detail) for r in verdict.rejections] == [
        (3, "worker_not_ready", "worker 'worker-1' has no free slot (4 of 4 busy)")
    ]
    assert validate(Batch(tuple(Dispatch(job, "worker-1") for job in jobs[:3])), ctx).ok


def test_a_worker_with_every_slot_busy_takes_no_job() -> None:
    """Busy only when no slot is free; a record that says ready with every slot taken
    is refused as well."""
    ctx = slotted_context(slots=2, busy={"worker-1": 2})
    assert validate(Dispatch("job-1", "worker-4"), ctx).ok
    verdict = validate(Dispatch("job-1", "worker-1"), ctx)
    assert [(r.reason, r.detail) for r in verdict.rejections] == [
        ("worker_not_ready", "worker 'worker-1' is busy")
    ]
    pool_1 = ctx.pools[0]
    full_but_ready = dataclasses.replace(pool_1.workers[0], status="ready")
    odd = dataclasses.replace(
        ctx, pools=(dataclasses.replace(pool_1, workers=(full_but_ready, *pool_1.workers[1:])),
                    ctx.pools[1]),
    )  # fmt: skip
    assert [r.detail for r in validate(Dispatch("job-1", "worker-1"), odd).rejections] == [
        "worker 'worker-1' has no free slot (2 of 2 busy)"
    ]


def test_only_a_worker_without_any_job_may_be_evicted() -> None:
    """A ready worker still running a job in one slot is busy for eviction, and so is
    one given a job earlier in the batch; an idle one may go."""
    ctx = slotted_context(slots=4, busy={"worker-1": 1}, extra_jobs=1)
    assert reasons(EvictWorker("worker-1"), ctx) == ["worker_busy"]
    assert reasons(EvictWorker("worker-4"), ctx) == []
    verdict = validate(Batch((Dispatch("job-1", "worker-4"), EvictWorker("worker-4"))), ctx)
    assert [(r.index, r.reason) for r in verdict.rejections] == [(1, "worker_busy")]
