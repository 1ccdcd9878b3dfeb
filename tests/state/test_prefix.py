"""The core's approximate prefix index (state/prefix.py) and what the live cluster
state does with it: blocks recorded at dispatch, bounded by KV capacity, forgotten
with the worker, sessions remembered, and all of it in the next context."""

from __future__ import annotations

import dataclasses

from orchestrator.domain.jobs import JobState
from orchestrator.domain.prefix import id_blocks, matched_blocks
from orchestrator.domain.prefix_queries import kv_capacity_tokens, prefix_match, session_worker
from orchestrator.state.prefix import PrefixIndex
from tests.fakes import FakeLocalPool, GiB, record
from tests.state.test_cluster import NOW, cluster

PROMPT = "a" * (512 * 4 * 3)  # three full blocks, before tokenizing


def test_lru_keeps_a_prompts_head_longest_and_stays_within_capacity() -> None:
    index = PrefixIndex()
    first, second = id_blocks([1, 2, 3], ""), id_blocks([7, 8, 9], "")
    index.record("w1", None, first, capacity=4)
    index.record("w1", None, second, capacity=4)
    # Four blocks fit: the newest prompt whole, and the head of the older one, since a
    # prompt's blocks are recorded last first (its tail is the first to go).
    assert index.blocks("w1") == 4
    assert index.matched("w1", None, second) == 3
    assert index.matched("w1", None, first) == 1


def test_another_tenants_traffic_never_evicts_a_tenants_blocks() -> None:
    """One order per (worker, tenant): acme cannot watch its blocks go as globex sends
    prompts, and so cannot learn when or how much globex sent."""
    index = PrefixIndex()
    mine = id_blocks(list(range(10)), "acme")
    index.record("w1", "acme", mine, capacity=10)
    before = index.state().for_tenant("acme")
    for n in range(5):
        index.record("w1", "globex", id_blocks([100 + n, 200 + n, 300 + n], "globex"), 10)
    assert index.matched("w1", "acme", mine) == 10
    assert index.state().for_tenant("acme").held == before.held
    assert index.state().held[("w1", "acme")] is before.held[("w1", "acme")]


def test_a_failed_attempt_takes_its_blocks_out_again() -> None:
    index = PrefixIndex()
    prompt = id_blocks([1, 2, 3], "")
    index.record("w1", None, prompt, capacity=100)
    index.discard("w1", None, prompt)
    assert index.matched("w1", None, prompt) == 0 and index.state().held == {}


def test_sessions_are_kept_per_tenant_and_dropped_with_their_worker() -> None:
    index = PrefixIndex(max_sessions=2)
    index.route("acme", "a", "w1")
    for n in range(5):  # globex's many sessions push out only globex's own
        index.route("globex", f"g{n}", "w2")
    assert index.session_worker("acme", "a") == "w1"
    assert [index.session_worker("globex", f"g{n}") for n in range(5)] == [None] * 3 + ["w2"] * 2
    index.retain({"w2"})  # w1 vanished without an eviction, having no blocks
    assert index.session_worker("acme", "a") is None


def test_state_reuses_unchanged_entries_and_splits_tenants() -> None:
    index = PrefixIndex()
    index.record("w1", "acme", id_blocks([1, 2], "acme"), capacity=100)
    index.record("w2", "globex", id_blocks([1], "globex"), capacity=100)
    before = index.state()
    assert index.state() is before  # nothing changed: the same object
    index.record("w2", "globex", id_blocks([5], "globex"), capacity=100)
    after = index.state()
    assert after.held[("w1", "acme")] is before.held[("w1", "acme")]
    assert len(after.held[("w2", "globex")]) == 2
    assert set(after.for_tenant("acme").held) == {("w1", "acme")}


def test_forgetting_a_worker_drops_its_blocks_and_sessions() -> None:
    index = PrefixIndex()
    index.record("w1", None, id_blocks([1, 2], ""), capacity=100)
    index.route(None, "chat-1", "w1")
    index.route("acme", "chat-1", "w2")  # another tenant's session of the same name
    assert index.session_worker(None, "chat-1") == "w1"
    index.forget("w1")
    assert index.blocks("w1") == 0 and index.state().held == {}
    assert index.session_worker(None, "chat-1") is None
    assert index.session_worker("acme", "chat-1") == "w2"


def test_sessions_are_bounded_least_recent_first() -> None:
    index = PrefixIndex(max_sessions=2)
    for n in range(3):
        index.route(None, f"s{n}", "w1")
    assert [index.session_worker(None, f"s{n}") for n in range(3)] == [None, "w1", "w1"]


def test_the_live_state_records_a_dispatched_prompt_and_shows_it_to_the_next_job() -> None:
    local = FakeLocalPool()
    local.add("w1")
    local.add("w2")
    state = cluster(local)
    first = record("j1", prompt=PROMPT + " first question", session_id="chat")
    state.enqueue(first, NOW)
    ctx = state.context(NOW)
    job = ctx.jobs_by_id["j1"]
    assert len(job.block_hashes) == 3 and job.prompt_tokens == first.input_tokens
    state.start(dataclasses.replace(first, state=JobState.DISPATCHED, worker_id="w2"))
    follow_up = record("j2", prompt=PROMPT + " second question", session_id="chat")
    state.enqueue(follow_up, NOW + 1)
    ctx = state.context(NOW + 2)
    job = ctx.jobs_by_id["j2"]
    assert prefix_match(ctx, job, "w2") == (3 * 512, 3)
    assert prefix_match(ctx, job, "w1") == (0, 0)
    found = session_worker(ctx, job)
    assert found is not None and found[1].id == "w2"
    # The worker stops without an eviction: the next context forgets it.
    del local.workers["w2"]
    local.version += 1
    ctx = state.context(NOW + 3)
    assert ctx.prefix.held == {}
    assert matched_blocks(ctx.prefix.holding("w2"), job.block_hashes) == 0


def test_kv_capacity_is_the_gpu_less_weights_shared_by_its_workers() -> None:
    local = FakeLocalPool()
    local.add("w1")
    local.add("w2")
    state = cluster(local)
    ctx = state.context(NOW)
    pool, worker = ctx.workers_by_id["w1"]
    model = ctx.catalog.get(worker.model_ref)
    per_token = (model.kv_bytes_per_token if model else 0) or 131_072
    assert kv_capacity_tokens(ctx, pool, worker) == (80 * GiB - 12 * GiB) // 2 // per_token


def test_the_live_state_forgets_a_prompt_whose_attempt_failed_before_its_first_token() -> None:
    local = FakeLocalPool()
    local.add("w1")
    state = cluster(local)
    job = record("j1", prompt=PROMPT)
    state.enqueue(job, NOW)
    state.context(NOW)
    sent = dataclasses.replace(job, state=JobState.DISPATCHED, worker_id="w1")
    state.start(sent)
    assert state.context(NOW + 1).prefix.held != {}
    state.attempt_failed(sent)
    assert state.context(NOW + 2).prefix.held == {}
    # After its first token the worker did process the prompt: the blocks stay.
    state.enqueue(dataclasses.replace(job, id="j2"), NOW + 3)
    state.context(NOW + 3)
    again = dataclasses.replace(job, id="j2", state=JobState.DISPATCHED, worker_id="w1")
    state.start(again)
    state.attempt_failed(dataclasses.replace(again, first_token_at=NOW + 4))
    assert state.context(NOW + 5).prefix.held != {}
