"""Context files: the ctx shape in YAML or JSON, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.context_file import context_from_dict, context_to_dict, load_context
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.samples import sample_context
from tests.slotted import slotted_context


def test_round_trip_of_the_sample_context() -> None:
    """context_to_dict then context_from_dict gives the same context back."""
    for platform_mode in (False, True):
        ctx = sample_context(platform_mode=platform_mode)
        assert context_from_dict(context_to_dict(ctx)) == ctx


def test_derived_fields_stand_in_for_their_sources() -> None:
    """wait_time_ms, uptime_ms and heartbeat_age_ms are turned into timestamps."""
    ctx = context_from_dict(
        {
            "now_ms": 10_000,
            "queue": [{"id": "j", "model_ref": "m", "wait_time_ms": 500}],
            "pools": [
                {
                    "id": "p",
                    "heartbeat_age_ms": 200,
                    "workers": [{"id": "w", "model_ref": "m", "uptime_ms": 1000}],
                }
            ],
            "tenants": {"t": {"name": "T", "quota_max_concurrent_jobs": 2}},
        }
    )
    assert ctx.queue[0].queued_at == 9_500
    assert ctx.pools[0].last_heartbeat_ms == 9_800
    assert ctx.pools[0].workers[0].started_at_ms == 9_000
    assert ctx.tenants[0].id == "t" and ctx.tenants[0].quota_max_concurrent_jobs == 2
    assert ctx.metrics.queue_depth == 1 and ctx.metrics.total_workers == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"queues": []}, "context.queues: unknown field"),
        ({"queue": [{"id": "j"}]}, "context.queue[0]: missing required field 'model_ref'"),
        (
            {"queue": [{"id": "j", "model_ref": "m", "colour": 1}]},
            "context.queue[0].colour: unknown field",
        ),
        (
            {"pools": [{"id": "p", "gpus": [{"id": "0"}]}]},
            "context.pools[0].gpus[0].id: expected int",
        ),
        ({"config": {"retry": {"enabled": "yes"}}}, "context.config.retry.enabled: expected bool"),
        ({"queue": [{"id": "j", "model_ref": "m", "max_tokens": True}]}, "got a boolean"),
        (
            {"pools": [{"id": "p", "workers": [{"id": "w", "model_ref": "m", "api": "vllm"}]}]},
            "context.pools[0].workers[0].api: 'vllm' is not one of llamacpp, openai",
        ),
        (
            {"pools": [{"id": "p", "workers": [{"id": "w", "model_ref": "m", "slots_total": 0}]}]},
            "context.pools[0].workers[0].slots_total: must be within 1..1024, got 0",
        ),
        (
            {"pools": [{"id": "p", "workers": [{"id": "w", "model_ref": "m", "slots_busy": 2}]}]},
            "context.pools[0].workers[0].slots_busy: must be within 0..slots_total (1), got 2",
        ),
        ({"now_ms": "soon"}, "context.now_ms: expected int, got str"),
        ({"metrics": {"timestamp_ms": 1.5}}, "context.metrics.timestamp_ms: expected int"),
        (
            {"now_ms": 10_000, "metrics": {"timestamp_ms": 20_000}},
            "context.metrics.timestamp_ms: 20000 is not now_ms (10000)",
        ),
    ],
)
def test_errors_name_the_field(data: dict[str, object], message: str) -> None:
    """Every malformed field is reported with its path."""
    with pytest.raises(ConfigError, match=None) as info:
        context_from_dict(data)
    assert message in str(info.value)


def test_yaml_syntax_errors_give_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error points at file:line:column."""
    path = tmp_path / "ctx.yaml"
    path.write_text("queue:\n  - id: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_context(path)
    assert str(info.value).startswith(f"{path}:3:1: invalid YAML")


def test_worker_slots_round_trip_and_default_to_the_spec_worker() -> None:
    """A batched worker's slots survive a round trip; omitted, a worker has one slot,
    none busy, no active jobs, and speaks llama.cpp (docs/ARCHITECTURE.md D27)."""
    ctx = slotted_context(slots=8, busy={"worker-1": 3})
    assert context_from_dict(context_to_dict(ctx)) == ctx
    data = context_to_dict(ctx)
    worker = data["pools"][0]["workers"][0]
    assert (worker["slots_total"], worker["slots_busy"], worker["api"]) == (8, 3, "llamacpp")
    assert worker["active_job_ids"] == ["run-worker-1-0", "run-worker-1-1", "run-worker-1-2"]
    bare = context_from_dict({"pools": [{"id": "p", "workers": [{"id": "w", "model_ref": "m"}]}]})
    (w,) = bare.pools[0].workers
    assert (w.slots_total, w.slots_busy, w.active_job_ids, w.api) == (1, 0, (), "llamacpp")


def test_a_context_is_at_its_own_time() -> None:
    """metrics.timestamp_ms, which a dump of ctx carries, is the context's time when it
    gives no now_ms: waits and ages are counted back from it, and metrics that give only
    their time are computed as if omitted. now_ms and a timestamp that agree are fine."""
    data = {
        "queue": [{"id": "j", "model_ref": "m", "wait_time_ms": 500}],
        "metrics": {"timestamp_ms": 10_000},
    }
    ctx = context_from_dict(data)
    assert ctx.now_ms == 10_000
    assert ctx.queue[0].queued_at == 9_500
    assert ctx.metrics.queue_depth == 1 and ctx.metrics.avg_wait_time_ms == 500
    assert context_from_dict({**data, "now_ms": 10_000}) == ctx
    given = context_from_dict({**data, "metrics": {"timestamp_ms": 10_000, "queue_depth": 7}})
    assert given.now_ms == 10_000 and given.metrics.queue_depth == 7
