"""The cache-aware template (issue 16) in both languages: cached prefixes draw their
jobs even to a busier worker, a session stays on its worker when nothing is cached,
load spreads the rest, every free slot is used, and the YAML's one action a cycle is
the Lua batch's first."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import pytest

from orchestrator.domain.context import Context, Job
from orchestrator.domain.decision import Decision, Dispatch, StartWorker, flatten
from orchestrator.domain.prefix import PrefixState
from orchestrator.domain.samples import MISTRAL_7B, sample_context
from orchestrator.policy.interpret import decide
from orchestrator.policy.parse import parse_policy
from orchestrator.scheduling.validation import validate
from orchestrator.wire import decision as wire_decision
from tests.conftest import LANGUAGES, REPO, InProcessRuntime
from tests.slotted import LLAMA_WORKERS, slotted_context

TEMPLATES = REPO / "schedulers" / "templates"
PROMPT = (11, 12, 13)  # a prompt of three full blocks
BLOCK_TOKENS = 512


def lua_decision(language: str, ctx: Context) -> Decision:
    runtime = InProcessRuntime(language)
    assert runtime.load((TEMPLATES / "cache-aware.lua").read_text()).ok
    result = runtime.run(ctx)
    assert result.error_kind == 0 and result.decision is not None, result.error_message
    decision = wire_decision.from_proto(result.decision)
    assert validate(decision, ctx).ok
    return decision


def yaml_dispatch(ctx: Context) -> tuple[str, str, str]:
    """(job, worker, rule) of what the YAML twin decides (one action a cycle), by the
    interpreter the compiled Lua is held to."""
    text = (TEMPLATES / "cache-aware.yaml").read_text()
    decision = decide(parse_policy(text, "cache-aware.yaml"), ctx)
    assert isinstance(decision, Dispatch), decision
    return decision.job_id, decision.worker_id, decision.rule


def dispatches(decision: Decision) -> list[tuple[str, str, str]]:
    return [(a.job_id, a.worker_id, a.rule) for a in flatten(decision) if isinstance(a, Dispatch)]


def with_prompts(
    ctx: Context, prompts: Mapping[str, tuple[int, ...]], session_worker: str | None = None
) -> Context:
    """`ctx` where each job named in `prompts` has those blocks (full, so its prompt
    is their tokens) and `session_worker`, and the others a prompt under one block."""
    queue = tuple(
        dataclasses.replace(
            job,
            block_hashes=prompts.get(job.id, ()),
            prompt_tokens=len(prompts.get(job.id, ())) * BLOCK_TOKENS or 100,
            session_worker=session_worker if job.id in prompts else None,
        )
        for job in ctx.queue
    )
    return dataclasses.replace(ctx, queue=queue)


def holding(ctx: Context, held: Mapping[str, tuple[int, ...]]) -> Context:
    state = {(worker, ""): frozenset(hashes) for worker, hashes in held.items()}
    return dataclasses.replace(ctx, prefix=PrefixState(BLOCK_TOKENS, MappingProxyType(state)))


def only(ctx: Context, *job_ids: str) -> Context:
    return dataclasses.replace(ctx, queue=tuple(j for j in ctx.queue if j.id in job_ids))


@pytest.mark.parametrize("language", LANGUAGES)
def test_on_the_sample_it_decides_as_the_platform_does(language: str) -> None:
    """No prompt is cached and no session known: least loaded, interactive first, and
    mistral, which nobody serves, gets a worker on the GPU with the most VRAM free."""
    ctx = sample_context()
    decision = lua_decision(language, ctx)
    assert dispatches(decision) == [
        ("job-1", "worker-4", "least-loaded"),
        ("job-4", "worker-3", "least-loaded"),
        ("job-3", "worker-1", "least-loaded"),
    ]
    starts = [a for a in flatten(decision) if isinstance(a, StartWorker)]
    assert [(s.model_ref, s.pool_id, s.gpu_id) for s in starts] == [(MISTRAL_7B, "pool-1", 2)]
    assert yaml_dispatch(ctx)[:2] == ("job-1", "worker-4")


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_cached_prefix_draws_its_job_to_a_busier_worker(language: str) -> None:
    """worker-1 holds job-1's whole prompt with two of its four slots busy; worker-4 is
    idle and on the cooler GPU. job-1 still goes to worker-1 (3 - 4 x 2/4 = 1 against
    0); job-3, cached nowhere, goes by load to worker-4."""
    ctx = holding(
        with_prompts(slotted_context(slots=4, busy={"worker-1": 2}), {"job-1": PROMPT}),
        {"worker-1": PROMPT},
    )
    assert [d for d in dispatches(lua_decision(language, ctx)) if d[1] in LLAMA_WORKERS] == [
        ("job-1", "worker-1", "prefix-affinity"),
        ("job-3", "worker-4", "least-loaded"),
    ]
    assert yaml_dispatch(ctx) == ("job-1", "worker-1", "interactive-cached")


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_short_match_does_not_outweigh_load(language: str) -> None:
    """worker-1 holds only the first of three blocks (3 x 1/3 - 4 x 2/4 = -1 against 0):
    the idle worker-4 takes the job."""
    ctx = holding(
        with_prompts(slotted_context(slots=4, busy={"worker-1": 2}), {"job-1": PROMPT}),
        {"worker-1": PROMPT[:1]},
    )
    assert dispatches(lua_decision(language, ctx))[0] == ("job-1", "worker-4", "prefix-affinity")
    assert yaml_dispatch(ctx)[:2] == ("job-1", "worker-4")


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("waited_ms", [1000, 6000])
def test_jobs_sharing_a_prefix_fill_the_cached_worker_then_wait_for_it(
    language: str, waited_ms: int
) -> None:
    """Five jobs of one cached prompt, four slots each: worker-1 takes them while its
    score stays ahead (at three busy it ties with idle worker-4 and wins on id). The
    fifth waits for worker-1's cache while it has waited less than HOLD_MS (5 s), and
    goes to worker-4 after. The Lua counts this cycle's dispatches as busy slots."""
    ctx = slotted_context(slots=4, extra_jobs=3)
    queue = tuple(
        dataclasses.replace(j, queued_at=ctx.now_ms - waited_ms + n)
        if j.id.startswith("extra")
        else j
        for n, j in enumerate(ctx.queue)
    )
    ctx = dataclasses.replace(ctx, queue=tuple(sorted(queue, key=Job.queue_key)))
    ctx = holding(with_prompts(ctx, {j.id: PROMPT for j in ctx.queue}), {"worker-1": PROMPT})
    llama = [d for d in dispatches(lua_decision(language, ctx)) if d[1] in LLAMA_WORKERS]
    placed = [(job, worker) for job, worker, _ in llama]
    assert placed[:4] == [
        ("job-1", "worker-1"),
        ("job-3", "worker-1"),
        ("extra-0", "worker-1"),
        ("extra-1", "worker-1"),
    ]
    assert placed[4:] == ([] if waited_ms < 5000 else [("extra-2", "worker-4")])


@pytest.mark.parametrize("language", LANGUAGES)
def test_without_prefixes_jobs_spread_by_load_and_fill_free_slots(language: str) -> None:
    """Two slots each, nothing cached: each llama-8b job goes to the smaller busy
    share, ties to the cooler GPU (worker-4), until both are full; the rest wait."""
    ctx = only(
        slotted_context(slots=2, extra_jobs=3), "job-1", "job-3", "extra-0", "extra-1", "extra-2"
    )
    assert [(job, worker) for job, worker, _ in dispatches(lua_decision(language, ctx))] == [
        ("job-1", "worker-4"),
        ("job-3", "worker-1"),
        ("extra-0", "worker-4"),
        ("extra-1", "worker-1"),
    ]
    assert yaml_dispatch(ctx)[:2] == ("job-1", "worker-4")


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_session_stays_on_its_worker_when_nothing_is_cached(language: str) -> None:
    """job-1's session last ran on worker-1: it goes back there though worker-4 is
    cooler; once worker-1 is full, or gone, load decides again."""
    ctx = with_prompts(slotted_context(slots=4), {"job-1": ()}, session_worker="worker-1")
    assert dispatches(lua_decision(language, ctx))[0] == ("job-1", "worker-1", "session-affinity")
    assert yaml_dispatch(ctx) == ("job-1", "worker-1", "interactive-session")
    full = with_prompts(
        slotted_context(slots=4, busy={"worker-1": 4}), {"job-1": ()}, session_worker="worker-1"
    )
    assert dispatches(lua_decision(language, full))[0] == ("job-1", "worker-4", "least-loaded")
    gone = with_prompts(slotted_context(slots=4), {"job-1": ()}, session_worker="worker-9")
    assert dispatches(lua_decision(language, gone))[0] == ("job-1", "worker-4", "least-loaded")


def test_a_cached_prefix_outranks_the_session() -> None:
    """worker-4 holds job-1's prompt, its session ran on worker-1: the cache wins."""
    ctx = holding(
        with_prompts(slotted_context(slots=4), {"job-1": PROMPT}, session_worker="worker-1"),
        {"worker-4": PROMPT},
    )
    assert dispatches(lua_decision("luajit", ctx))[0] == ("job-1", "worker-4", "prefix-affinity")
    assert yaml_dispatch(ctx)[:2] == ("job-1", "worker-4")
