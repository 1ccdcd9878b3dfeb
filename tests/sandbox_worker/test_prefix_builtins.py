"""The prefix built-ins (issue 16, docs/RUNTIME-EXTENSIONS.md) in the real Lua runtime,
held to their Python side (orchestrator/domain/prefix.py), on snapshots and deltas."""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

import pytest

from orchestrator.config.context_file import context_from_dict
from orchestrator.domain import prefix, prefix_queries
from orchestrator.domain.context import Context
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.prefix import PrefixState, id_blocks
from orchestrator.domain.samples import LLAMA_8B, sample_context
from orchestrator.scheduling.tenancy import tenant_view
from orchestrator.wire import context as wire
from sandbox_worker.runtime import LuaSchedulerRuntime
from tests.conftest import InProcessRuntime

IDS = "(function(list) local out = {} for i, x in ipairs(list) do out[i] = x.id end return out end)"
BLOCKS = id_blocks(list(range(6)), "")  # a 3,000-token prompt: 5 full blocks and a bit


def prefixed(held: dict[str, int], *, session_worker: str | None = None) -> Context:
    """The sample context with job-1 (llama-8b) carrying BLOCKS; each worker in `held`
    holds that many of its leading blocks."""
    ctx = sample_context()
    queue = tuple(
        dataclasses.replace(
            job, prompt_tokens=3000, block_hashes=BLOCKS[:5], session_worker=session_worker
        )
        if job.id == "job-1"
        else job
        for job in ctx.queue
    )
    state = PrefixState(
        512, MappingProxyType({(w, ""): frozenset(BLOCKS[:n]) for w, n in held.items()})
    )
    return dataclasses.replace(ctx, queue=queue, prefix=state)


def test_job_fields_show_tokens_and_a_count_of_blocks_never_the_hashes(
    lua: InProcessRuntime,
) -> None:
    ctx = prefixed({})
    assert lua.eval("ctx.get_job('job-1').prompt_tokens", ctx) == 3000
    assert lua.eval("ctx.get_job('job-1').prompt_blocks", ctx) == 5
    fields = "(function(j) local n = 0 for k in pairs(j) do n = n + 1 end return n end)"
    plain = lua.eval(f"{fields}(ctx.get_job('job-3'))", ctx)  # a seed, like job-1
    assert lua.eval(f"{fields}(ctx.get_job('job-1'))", ctx) == plain  # same fields


def test_prefix_match_stops_at_the_first_missing_block(lua: InProcessRuntime) -> None:
    ctx = prefixed({"worker-1": 2, "worker-4": 5})
    assert lua.eval("ctx.prefix_match('job-1', 'worker-1')", ctx) == [1024, 2]
    assert lua.eval(
        "ctx.prefix_match(ctx.get_job('job-1'), ctx.get_pool('pool-2').workers[1])", ctx
    ) == [
        2560,
        5,
    ]
    assert lua.eval("ctx.prefix_match('job-1', 'worker-2')", ctx) == [0, 0]
    assert lua.eval("ctx.prefix_match('job-2', 'worker-4')", ctx) == [0, 0]
    # A gap: the worker holds blocks 2..5 but not the first, so nothing is reused.
    gap = PrefixState(512, MappingProxyType({("worker-1", ""): frozenset(BLOCKS[1:5])}))
    assert lua.eval(
        "ctx.prefix_match('job-1', 'worker-1')", dataclasses.replace(ctx, prefix=gap)
    ) == [0, 0]
    for worker in ("worker-1", "worker-4", "worker-2"):
        job = ctx.jobs_by_id["job-1"]
        assert list(prefix_queries.prefix_match(ctx, job, worker)) == lua.eval(
            f"ctx.prefix_match('job-1', '{worker}')", ctx
        )


def test_find_workers_by_prefix_orders_by_match_then_load(lua: InProcessRuntime) -> None:
    """llama-8b runs on worker-1 (pool-1) and worker-4 (pool-2). With no match, the
    least loaded comes first (equal loads: by id); a match wins over load."""
    none = prefixed({})
    job = none.jobs_by_id["job-1"]
    assert lua.eval(f"{IDS}(ctx.find_workers_by_prefix('job-1'))", none) == [
        w.id for _, w in prefix_queries.find_workers_by_prefix(none, job)
    ]
    cached = prefixed({"worker-4": 1})
    order = lua.eval(f"{IDS}(ctx.find_workers_by_prefix(ctx.get_job('job-1')))", cached)
    assert order[0] == "worker-4"
    assert order == [w.id for _, w in prefix_queries.find_workers_by_prefix(cached, job)]
    assert all(
        w.model_ref == LLAMA_8B for _, w in prefix_queries.find_workers_by_prefix(cached, job)
    )


def test_session_worker_is_the_worker_while_it_exists(lua: InProcessRuntime) -> None:
    assert lua.eval("ctx.session_worker('job-1').id", prefixed({}, session_worker="worker-4")) == (
        "worker-4"
    )
    assert lua.eval("ctx.session_worker('job-1')", prefixed({}, session_worker="gone")) is None
    assert lua.eval("ctx.session_worker('job-2')", prefixed({})) is None


@pytest.mark.parametrize(
    "expression", ["ctx.prefix_match(1, 'worker-1')", "ctx.session_worker({})"]
)
def test_bad_arguments_are_clear_errors(lua: InProcessRuntime, expression: str) -> None:
    reply = lua.load(f"function schedule(ctx) {expression} return {{action='wait'}} end")
    assert reply.ok
    result = lua.run(prefixed({}))
    assert "must be a job or its id" in result.error_message


@pytest.mark.parametrize("language", ["luajit", "lua54"])
def test_deltas_add_and_remove_blocks_as_snapshots_do(language: str) -> None:
    """A worker fed a snapshot then deltas answers as one fed each context whole."""
    steps = [
        prefixed({"worker-1": 2}),
        prefixed({"worker-1": 4, "worker-4": 1}),
        prefixed({"worker-4": 5}),  # worker-1's blocks all evicted
        prefixed({}),
    ]
    script = (
        "function schedule(ctx)\n"
        "  local a = {ctx.prefix_match('job-1', 'worker-1')}\n"
        "  local b = {ctx.prefix_match('job-1', 'worker-4')}\n"
        "  ctx.log_info(a[2] .. ',' .. b[2])\n"
        "  return {action='wait'}\nend\n"
    )

    def runtime() -> LuaSchedulerRuntime:
        lua = InProcessRuntime(language)
        assert lua.load(script).ok
        assert lua.runtime is not None
        return lua.runtime

    fed_deltas, fed_whole = runtime(), runtime()
    previous = None
    for ctx in steps:
        if previous is None:
            fed_deltas.apply_snapshot(wire.to_proto(ctx))
        else:
            delta = wire.diff(previous, ctx)
            fed_deltas.apply_delta(delta)
            assert wire.apply_delta(previous, delta).prefix == ctx.prefix
        fed_whole.apply_snapshot(wire.to_proto(ctx))
        a, b = (rt.run(False, False).logs[-1][1] for rt in (fed_deltas, fed_whole))
        assert a == b
        previous = ctx
    assert a == "0,0"


def test_snapshot_round_trip_keeps_blocks_and_sessions() -> None:
    ctx = prefixed({"worker-1": 3}, session_worker="worker-1")
    back = wire.from_proto(wire.to_proto(ctx))
    assert back.prefix == ctx.prefix
    assert back.jobs_by_id["job-1"].block_hashes == BLOCKS[:5]
    assert back.jobs_by_id["job-1"].session_worker == "worker-1"
    assert back.jobs_by_id["job-1"].prompt_tokens == 3000


def test_a_tenant_sees_only_blocks_of_its_own_prompts() -> None:
    ctx = sample_context()
    state = PrefixState(
        512,
        MappingProxyType(
            {("worker-1", "acme"): frozenset({1, 2}), ("worker-1", "globex"): frozenset({3})}
        ),
    )
    view = tenant_view(dataclasses.replace(ctx, prefix=state), "acme", {})
    assert dict(view.prefix.held) == {("worker-1", "acme"): frozenset({1, 2})}


def test_jobs_built_from_records_carry_blocks_salted_by_tenant() -> None:
    text = "x" * (512 * 4 * 3 + 10)
    assert len(prefix.text_blocks(text, "acme")) == 3
    assert prefix.text_blocks(text, "acme") != prefix.text_blocks(text, "globex")
    # Chained: a shared first block gives the same first hash, a different second block
    # changes the second hash and every one after it.
    other = "x" * (512 * 4) + "y" * (512 * 4 * 2)
    a, b = prefix.text_blocks(text, "acme"), prefix.text_blocks(other, "acme")
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    assert all(0 <= h < 2**prefix.HASH_BITS for h in a)


def test_a_block_hash_of_zero_reaches_the_sandbox(lua: InProcessRuntime) -> None:
    """Whether the hash column is sent depends on the jobs having blocks, not on the
    hashes' values: a job whose only hash is 0 still has it."""
    ctx = prefixed({})
    queue = tuple(
        dataclasses.replace(j, block_hashes=(0,)) if j.id == "job-1" else j for j in ctx.queue
    )
    held = PrefixState(512, MappingProxyType({("worker-1", ""): frozenset({0})}))
    ctx = dataclasses.replace(ctx, queue=queue, prefix=held)
    assert lua.eval("ctx.prefix_match('job-1', 'worker-1')", ctx) == [512, 1]


@pytest.mark.parametrize(
    ("hashes", "message"),
    [([2**52], "must be between 0 and 2**52 - 1"), ([-1], "must be between"),
     (list(range(4097)), "at most 4096 blocks")],
)  # fmt: skip
def test_context_files_refuse_hashes_the_core_would_not_make(
    hashes: list[int], message: str
) -> None:
    data = {"now_ms": 1, "queue": [{"id": "j", "model_ref": "m", "block_hashes": hashes}]}
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        context_from_dict(data)
    assert "queue[0].block_hashes" in str(caught.value)
