"""platform.lua with batched servers (docs/ARCHITECTURE.md D27): jobs spread by the
share of slots busy, a worker takes as many as it has free slots, and only a worker
with no job in any slot is evicted. With one slot per worker it decides as before
(tests/schedulers/test_examples.py)."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.domain.context import Context
from orchestrator.domain.decision import Decision, EvictWorker, flatten
from orchestrator.scheduling.engine import platform_source
from orchestrator.scheduling.validation import validate
from orchestrator.wire import decision as wire_decision
from tests.conftest import LANGUAGES, InProcessRuntime
from tests.schedulers.test_examples import over_threshold
from tests.slotted import running, slotted_context


def platform_decision(language: str, ctx: Context) -> Decision:
    runtime = InProcessRuntime(language)
    runtime.load(platform_source())
    result = runtime.run(ctx)
    assert result.error_kind == 0 and result.decision is not None, result.error_message
    return wire_decision.from_proto(result.decision)


def dispatches(decision: Decision) -> list[tuple[str, str]]:
    return [(a.job_id, a.worker_id) for a in flatten(decision) if a.action == "dispatch"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("language", LANGUAGES)
def test_jobs_spread_by_load_and_fill_each_worker_up_to_its_slots(language: str) -> None:
    """Four slots each; worker-1 runs one job, worker-4 (the cooler GPU) none. Each
    llama-8b job goes to the smaller share of busy slots, ties to the cooler GPU, until
    both are full: worker-4 takes four jobs, worker-1 three, and the eighth waits."""
    ctx = slotted_context(slots=4, busy={"worker-1": 1}, extra_jobs=6)
    decision = platform_decision(language, ctx)
    llama = [(job, worker) for job, worker in dispatches(decision) if worker != "worker-3"]
    assert llama == [
        ("job-1", "worker-4"),  # 0/4 beats 1/4
        ("job-3", "worker-4"),  # 1/4 each: the cooler GPU
        ("extra-0", "worker-1"),  # 1/4 beats 2/4
        ("extra-1", "worker-4"),
        ("extra-2", "worker-1"),
        ("extra-3", "worker-4"),  # worker-4 full
        ("extra-4", "worker-1"),  # worker-1 full; extra-5 waits
    ]
    assert validate(decision, ctx).ok


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_worker_running_a_job_in_one_slot_is_not_evicted(language: str) -> None:
    """Over the VRAM threshold the least recently used idle worker goes: worker-3, but
    not while it runs a job in one of its two slots; then worker-1 goes instead."""
    ctx = over_threshold(slotted_context(slots=1))
    ctx = dataclasses.replace(ctx, queue=tuple(j for j in ctx.queue if j.id == "job-2"))
    evicted = [a.worker_id for a in flatten(platform_decision(language, ctx))
               if isinstance(a, EvictWorker)]  # fmt: skip
    assert evicted == ["worker-3"]
    pool_1 = ctx.pools[0]
    worker_3 = running(dataclasses.replace(pool_1.workers[2], slots_total=2), 1)
    assert worker_3.status == "ready"
    ctx = dataclasses.replace(
        ctx, pools=(dataclasses.replace(pool_1, workers=(*pool_1.workers[:2], worker_3)),
                    ctx.pools[1]),
    )  # fmt: skip
    decision = platform_decision(language, ctx)
    evicted = [a.worker_id for a in flatten(decision) if isinstance(a, EvictWorker)]
    assert evicted == ["worker-1"]
    assert validate(decision, ctx).ok


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_spec_record_naming_a_current_job_has_no_free_slot(language: str) -> None:
    """A context written for the spec alone: worker-4 says ready but names a current
    job, and counts no busy slot. Its one slot is taken, as the platform always read it."""
    ctx = slotted_context(slots=1)
    pool_2 = ctx.pools[1]
    named = dataclasses.replace(pool_2.workers[0], current_job_id="job-elsewhere")
    ctx = dataclasses.replace(
        ctx, pools=(ctx.pools[0], dataclasses.replace(pool_2, workers=(named,)))
    )
    placed = dispatches(platform_decision(language, ctx))
    assert ("job-1", "worker-1") in placed
    assert "worker-4" not in {worker for _, worker in placed}
