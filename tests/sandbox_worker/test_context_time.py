"""The sandbox runs at the context's own time (issue 17, item 6), and waits are never
negative, on LuaJIT and on Lua 5.4."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from orchestrator.config.context_file import load_context
from orchestrator.domain.samples import NOW_MS, sample_context
from tests.conftest import InProcessRuntime

RECORDED = 1_696_348_805_000  # runtime-spec section 3.5's example timestamp


def test_a_context_file_is_evaluated_at_its_timestamp(
    lua: InProcessRuntime, tmp_path: Path
) -> None:
    """A dump of ctx (metrics.timestamp_ms, waits, no now_ms) runs at the dump's time:
    the script sees that time, and the waits the file gives, not the wall clock's."""
    path = tmp_path / "ctx.json"
    path.write_text(
        json.dumps(
            {
                "queue": [{"id": "j", "model_ref": "m", "wait_time_ms": 5_000}],
                "pools": [{"id": "p", "heartbeat_age_ms": 500}],
                "metrics": {"timestamp_ms": RECORDED},
            }
        )
    )
    ctx = load_context(path)
    seen = lua.eval(
        "ctx.now(), ctx.metrics.timestamp_ms, ctx.elapsed_since(ctx.queue[1].queued_at), "
        "ctx.queue[1].wait_time_ms, ctx.calculate_wait_time(ctx.queue[1]), "
        "ctx.pools[1].heartbeat_age_ms, ctx.metrics.queue_depth",
        ctx,
    )
    assert seen == [RECORDED, RECORDED, 5_000, 5_000, 5_000, 500, 1]


def test_wait_times_are_never_negative(lua: InProcessRuntime) -> None:
    """A job queued after the context's time (another host's clock) has waited 0 ms,
    whichever way a script asks; the priority score does not age backwards."""
    base = sample_context()
    ahead = dataclasses.replace(base.queue[0], queued_at=NOW_MS + 60_000)
    ctx = dataclasses.replace(base, queue=(ahead, *base.queue[1:]))
    seen = lua.eval(
        f"""ctx.get_job('{ahead.id}').wait_time_ms,
        ctx.calculate_wait_time(ctx.get_job('{ahead.id}')),
        ctx.helpers.calculate_wait_time('{ahead.id}'),
        ctx.elapsed_since({NOW_MS + 60_000}),
        (function() for k, v in pairs(ctx.get_job('{ahead.id}')) do
           if k == 'wait_time_ms' then return v end end end)(),
        ctx.get_job_priority_score(ctx.get_job('{ahead.id}')),
        ctx.elapsed_since({NOW_MS - 250})""",
        ctx,
    )
    base_score = 1000 if ahead.priority == "interactive" else 100
    assert seen == [0, 0, 0, 0, 0, base_score, 250]
