"""Every Lua example of both specs, verbatim from schedulers/examples/, in real sandbox workers."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.domain.context import Context
from orchestrator.domain.decision import Dispatch, EvictWorker
from orchestrator.domain.samples import GiB, sample_context
from tests.conftest import LANGUAGES, REPO, EngineFactory

EXAMPLES = REPO / "schedulers" / "examples"


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def test_examples_are_verbatim_copies_of_the_specs() -> None:
    """Each example file appears word for word in one of the spec documents."""
    seeds = REPO.parent / "shared" / "seeds"
    if not seeds.exists():
        pytest.skip("the spec documents are not next to this checkout")
    specs = "".join(p.read_text() for p in seeds.glob("*.md"))
    files = sorted(EXAMPLES.glob("*.lua"))
    assert len(files) == 8
    for path in files:
        assert path.read_text() in specs, path.name


def over_threshold(ctx: Context) -> Context:
    """pool-1 at 95 % of its VRAM (runtime-spec 7.4's trigger)."""
    pool = ctx.pools[0]
    gpus = tuple(
        dataclasses.replace(
            g,
            vram_allocated_bytes=int(g.vram_total_bytes * 0.95),
            vram_free_bytes=g.vram_total_bytes - int(g.vram_total_bytes * 0.95),
        )
        for g in pool.gpus
    )
    return dataclasses.replace(ctx, pools=(dataclasses.replace(pool, gpus=gpus), ctx.pools[1]))


def without_seeds(ctx: Context) -> Context:
    return dataclasses.replace(
        ctx, queue=tuple(dataclasses.replace(j, seed=None) for j in ctx.queue)
    )


# (file, context, expected decision, a log line it must write)
CASES = [
    ("runtime-2-entry-point.lua", sample_context(), Dispatch("job-1", "worker-4"), None),
    (
        "runtime-7.1-simple-priority.lua",
        sample_context(),
        Dispatch("job-1", "worker-4"),
        "Dispatching interactive job: job-1",
    ),
    # job-1 is small: it goes to an RTX 4090 worker (GPU 0).
    ("runtime-7.2-gpu-specific.lua", sample_context(), Dispatch("job-1", "worker-1"), None),
    (
        "runtime-7.3-determinism-first.lua",
        sample_context(),
        Dispatch("job-1", "worker-1"),
        "Dispatching deterministic job: job-1 (seed: 42)",
    ),
    ("runtime-7.4-vram-aware-eviction.lua", sample_context(), Dispatch("job-1", "worker-4"), None),
    # Over the threshold, pool-1's least recently used idle worker goes.
    (
        "runtime-7.4-vram-aware-eviction.lua",
        over_threshold(sample_context()),
        EvictWorker("worker-3", reason="vram_threshold_exceeded"),
        "Pool pool-1 over threshold, evicting worker: worker-3",
    ),
    # The first batch job with a ready worker is job-3 (llama-8b); worker-4 has most VRAM free.
    ("programmable-6.2-batch-optimized.lua", sample_context(), Dispatch("job-3", "worker-4"), None),
]


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize(
    ("name", "ctx", "expected", "log_line"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
async def test_example_yields_valid_decision(
    make_engine: EngineFactory,
    language: str,
    name: str,
    ctx: Context,
    expected: object,
    log_line: str | None,
) -> None:
    """The example loads and its decision passes validation, served by the user scheduler."""
    engine = await make_engine(example(name), language=language, user_spares=0, platform_spares=0)
    result = await engine.schedule(ctx)
    assert result.source == "user", result.error
    assert result.decision == expected
    if log_line is not None:
        assert log_line in [line.message for line in result.logs]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_example_calling_undefined_helper_falls_back_cleanly(
    make_engine: EngineFactory, language: str
) -> None:
    """programmable-spec 3.1 calls find_best_worker, which no runtime defines: a clean fallback."""
    engine = await make_engine(
        example("programmable-3.1-user-defined.lua"),
        language=language,
        user_spares=0,
        platform_spares=0,
    )
    result = await engine.schedule(sample_context())
    assert result.source == "platform-fallback"
    assert result.error is not None and result.error.kind == "lua_error"
    assert "find_best_worker" in result.error.message
    # Without seeded jobs the same script reaches `return platform.schedule(context)`.
    unseeded = await engine.schedule(without_seeds(sample_context()))
    assert unseeded.source == "user"
    assert unseeded.decision.action == "batch"


@pytest.mark.parametrize("language", LANGUAGES)
async def test_example_raising_error_falls_back_with_its_message(
    make_engine: EngineFactory, language: str
) -> None:
    """runtime-spec 8.1's error('Something went wrong!') is caught, logged and falls back."""
    engine = await make_engine(
        example("runtime-8.1-error.lua"),
        language=language,
        user_name="runtime-8.1-error.lua",
        user_spares=0,
        platform_spares=0,
    )
    result = await engine.schedule(sample_context())
    assert result.source == "platform-fallback"
    assert result.error is not None
    assert "Something went wrong!" in result.error.message
    assert "runtime-8.1-error.lua:3" in result.error.traceback


@pytest.mark.parametrize("language", LANGUAGES)
async def test_platform_scheduler_features(make_engine: EngineFactory, language: str) -> None:
    """platform.lua: interactive first, least loaded, quotas, preemptive start, LRU eviction."""
    engine = await make_engine(None, language=language, user_spares=0, platform_spares=0)
    lab = await engine.schedule(sample_context())
    assert lab.source == "platform"
    actions = [
        (a.action, getattr(a, "job_id", None), getattr(a, "worker_id", None), a.rule)
        for a in lab.decision.actions
    ]  # type: ignore[union-attr]
    assert actions[:3] == [
        ("dispatch", "job-1", "worker-4", "interactive-first"),  # least-loaded llama-8b worker
        ("dispatch", "job-4", "worker-3", "interactive-first"),
        ("dispatch", "job-3", "worker-1", "least-loaded"),
    ]
    start = lab.decision.actions[3]  # type: ignore[union-attr]
    assert (start.action, start.model_ref) == (
        "start_worker",
        sample_context().catalog.resolve("mistral-7b"),
    )  # type: ignore[union-attr]
    # tenant-2 is at its concurrency quota: job-4 and job-5 wait, and no worker starts for job-5.
    platform = await engine.schedule(sample_context(platform_mode=True))
    assert [(a.action, getattr(a, "job_id", "")) for a in platform.decision.actions] == [  # type: ignore[union-attr]
        ("dispatch", "job-1"),
        ("dispatch", "job-3"),
    ]
    # Over the threshold, the LRU idle worker not needed by the queue is evicted.
    busy = over_threshold(sample_context())
    only_batch = dataclasses.replace(busy, queue=tuple(j for j in busy.queue if j.id == "job-2"))
    evicting = await engine.schedule(only_batch)
    evictions = [
        a
        for a in getattr(evicting.decision, "actions", [evicting.decision])
        if a.action == "evict_worker"
    ]
    assert [e.worker_id for e in evictions] == ["worker-3"]  # type: ignore[attr-defined]
    assert GiB  # the helper module's unit is what the thresholds are written in
