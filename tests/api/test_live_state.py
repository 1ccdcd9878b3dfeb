"""The live view's state: each worker with its slots (docs/ARCHITECTURE.md D27)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from orchestrator.api.web.ui import live_state
from tests.slotted import slotted_context


def test_each_worker_shows_its_slots_and_the_jobs_in_them() -> None:
    ctx = slotted_context(slots=8, busy={"worker-1": 3})
    front = SimpleNamespace(
        last_result=SimpleNamespace(context=ctx),
        catalog=ctx.catalog,
        status=lambda: {},
        recent=[],
    )
    state = live_state(cast(Any, front))
    workers = {w["id"]: w for pool in state["pools"] for w in pool["workers"]}
    assert {k: workers["worker-1"][k] for k in ("status", "job", "slots_total", "slots_busy")} == {
        "status": "ready", "job": "run-worker-1-0", "slots_total": 8, "slots_busy": 3,
    }  # fmt: skip
    assert workers["worker-1"]["active_job_ids"] == [f"run-worker-1-{n}" for n in range(3)]
    assert (workers["worker-2"]["slots_busy"], workers["worker-2"]["slots_total"]) == (1, 1)
