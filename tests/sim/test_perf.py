"""The simulator's performance model (sim/perf.py) against published measurements, and
the batched workers it drives (sim/cluster.py). Everything here is computed from the
catalog and the simulated clock: no test measures time.

VALIDATION is docs/SIMULATION.md's fidelity table: each figure, its published value,
and how the model computes it from the catalog's parameters, so the table cannot drift
from the code. CALIBRATION pins the catalog's numbers to the figures they were fitted to.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from orchestrator.config.settings import load_catalog, load_config
from orchestrator.domain.context import Config
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker
from orchestrator.domain.serving import ServingPerf, for_device
from orchestrator.sim import perf
from orchestrator.sim.cluster import ClusterSpec, Event, SimCluster, SimJob
from orchestrator.sim.run import simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import Arrival

CATALOG = load_catalog(load_config(None))
TOLERANCE = 0.05  # the largest error docs/SIMULATION.md reports is under this


def entry(model: str, device: str) -> ServingPerf:
    found = CATALOG.get(model)
    assert found is not None
    table = for_device(found.performance, device)
    assert table is not None
    return table


# llama-bench's figures: ppN processes an N-token prompt from an empty cache, tgN
# generates N tokens from an empty context, one sequence; both in tokens/s.
def pp(p: ServingPerf, n: int) -> float:
    return n / perf.prefill_ms(p, n) * 1000


def tg(p: ServingPerf, n: int) -> float:
    return n / perf.decode_ms(p, 1, 0, n) * 1000


@dataclass(frozen=True)
class Figure:
    what: str  # GPU, engine, model, test
    model: str  # catalog alias
    device: str  # the GPU's name as NVML gives it
    published: float
    computed: Callable[[ServingPerf], float]

    def error(self) -> float:
        return self.computed(entry(self.model, self.device)) / self.published - 1


# XiongjieDai/GPU-Benchmarks-on-LLM-Inference, LLaMA 3 notebooks (llama.cpp llama-bench,
# May 2024, Llama-3-8B Q4_K_M; the catalog's llama-8b is Llama-3.1-8B, the same shape).
SXM, PCIE = "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
R4090, R3090 = "NVIDIA RTX 4090", "NVIDIA GeForce RTX 3090"  # the latter: `default`
CALIBRATION = [
    Figure(f"{d} pp{n}", "llama-8b", d, v, functools.partial(pp, n=n))
    for d, n, v in [
        (SXM, 512, 5947.64), (SXM, 8192, 4137.08),
        (R4090, 512, 7138.99), (R4090, 8192, 4039.68),
        (R3090, 512, 4030.40), (R3090, 8192, 2527.40),
    ]
] + [
    Figure(f"{d} tg{n}", "llama-8b", d, v, functools.partial(tg, n=n))
    for d, n, v in [
        (SXM, 512, 135.04), (SXM, 8192, 115.92),
        (R4090, 512, 130.58), (R4090, 8192, 110.66),
        (R3090, 512, 115.42), (R3090, 8192, 87.49),
    ]
]  # fmt: skip


def seventy_slope(published: float, term: str) -> Figure:
    """Llama-3-70B Q4_K_M's context terms on the A100 (80 layers x 8192 against 32 x 4096:
    5.0 times the 8B's, by the rule the catalog's Mistral and Qwen entries follow)."""

    def computed(p: ServingPerf) -> float:
        return 5.0 * float(getattr(p, term))

    return Figure(f"{SXM} Llama-3-70B {term}", "llama-8b", SXM, published, computed)


VALIDATION = [
    Figure("A100 SXM pp1024 (tokens/s)", "llama-8b", SXM, 5863.92, lambda p: pp(p, 1024)),
    Figure("A100 SXM pp4096 (tokens/s)", "llama-8b", SXM, 5121.60, lambda p: pp(p, 4096)),
    Figure("A100 SXM tg1024 (tokens/s)", "llama-8b", SXM, 133.38, lambda p: tg(p, 1024)),
    Figure("A100 SXM tg4096 (tokens/s)", "llama-8b", SXM, 125.09, lambda p: tg(p, 4096)),
    # llama-cli generating 1,023 tokens after a 258-token prompt: ms per token.
    Figure(
        "A100 SXM llama-cli, 1,023 tokens after 258 (ms/token)",
        "llama-8b",
        SXM,
        7.58,
        lambda p: perf.decode_ms(p, 1, 258, 1023) / 1023,
    ),
    Figure("A100 PCIe pp1024 (tokens/s)", "llama-8b", PCIE, 5800.48, lambda p: pp(p, 1024)),
    Figure("A100 PCIe pp4096 (tokens/s)", "llama-8b", PCIE, 4959.84, lambda p: pp(p, 4096)),
    Figure("A100 PCIe tg1024 (tokens/s)", "llama-8b", PCIE, 138.31, lambda p: tg(p, 1024)),
    Figure("A100 PCIe tg4096 (tokens/s)", "llama-8b", PCIE, 127.22, lambda p: tg(p, 4096)),
    Figure("RTX 4090 pp1024 (tokens/s)", "llama-8b", R4090, 6898.71, lambda p: pp(p, 1024)),
    Figure("RTX 4090 tg1024 (tokens/s)", "llama-8b", R4090, 127.74, lambda p: tg(p, 1024)),
    Figure("RTX 3090 pp4096 (tokens/s)", "llama-8b", R3090, 3169.91, lambda p: pp(p, 4096)),
    Figure("RTX 3090 tg4096 (tokens/s)", "llama-8b", R3090, 97.31, lambda p: tg(p, 4096)),
    # The 70B's slopes: (1000/tg8192 - 1000/tg512) / 3.84 and the same of pp, per token.
    seventy_slope((1000 / 21.32 - 1000 / 24.61) / 3.84, "decode_per_1k_context_ms"),
    seventy_slope((1000 / 625.66 - 1000 / 817.58) / 3.84 * 1000, "prefill_per_1k_context_ms"),
]


@pytest.mark.parametrize("figure", CALIBRATION, ids=lambda f: f.what)
def test_the_catalog_reproduces_the_figures_it_was_fitted_to(figure: Figure) -> None:
    assert abs(figure.error()) < 0.005  # rounding the catalog's numbers


@pytest.mark.parametrize("figure", VALIDATION, ids=lambda f: f.what)
def test_the_model_predicts_figures_it_was_not_fitted_to(figure: Figure) -> None:
    """docs/SIMULATION.md's validation table."""
    assert abs(figure.error()) < TOLERANCE


# The derived entries (Mistral-7B-v0.3, Qwen2.5-14B): the Llama entry of the same GPU,
# scaled by rules the A100's Llama-3 8B and 70B Q4_K_M figures give (docs/SIMULATION.md).
BASE_8B = 1000 / 135.04 - 0.3181 * 0.256  # the 8B's step at no context, ms
BASE_70B = 1000 / 24.61 - (1000 / 21.32 - 1000 / 24.61) / 3.84 * 0.256
TOKEN_8B = 1000 / 6126.4  # the 8B's prompt token, ms
TOKEN_70B = 1000 / 817.58 - (1000 / 625.66 - 1000 / 817.58) / 3.84 * 0.256
DERIVED = {  # alias: (weights GiB, parameters B, layers x hidden size)
    "mistral-7b": (4.07, 7.25, 32 * 4096),
    "qwen-14b": (8.37, 14.77, 48 * 5120),
}


@pytest.mark.parametrize("device", [SXM, R4090, R3090])
@pytest.mark.parametrize("alias", sorted(DERIVED))
def test_derived_entries_follow_their_rules(alias: str, device: str) -> None:
    gib, params, width = DERIVED[alias]
    per_gib = (BASE_70B - BASE_8B) / (39.59 - 4.58)
    per_b = (TOKEN_70B - TOKEN_8B) / (70.55 - 8.03)
    base = (BASE_8B + per_gib * (gib - 4.58)) / BASE_8B
    compute = (TOKEN_8B + per_b * (params - 8.03)) / TOKEN_8B
    attention = width / (32 * 4096)
    llama, derived = entry("llama-8b", device), entry(alias, device)
    expected = {
        "decode_base_ms": llama.decode_base_ms * base,
        "decode_per_seq_ms": llama.decode_per_seq_ms * compute,
        "prefill_tokens_per_s": llama.prefill_tokens_per_s / compute,
        "decode_per_1k_context_ms": llama.decode_per_1k_context_ms * attention,
        "prefill_per_1k_context_ms": llama.prefill_per_1k_context_ms * attention,
    }
    for name, value in expected.items():
        assert getattr(derived, name) == pytest.approx(value, rel=0.005), name


def test_kv_bytes_per_token_follow_the_models_shapes() -> None:
    """layers x KV heads x head size x 2 (K and V) x 2 bytes, from each config.json."""
    shapes = {"llama-8b": (32, 8, 128), "mistral-7b": (32, 8, 128), "qwen-14b": (48, 8, 128)}
    for alias, (layers, heads, size) in shapes.items():
        model = CATALOG.get(alias)
        assert model is not None and model.kv_bytes_per_token == layers * heads * size * 2 * 2


# ---------------------------------------------------------------- the model, pure
A100 = entry("llama-8b", SXM)


def test_prefill_grows_with_uncached_tokens_and_the_context_they_see() -> None:
    times = [perf.prefill_ms(A100, n) for n in (256, 512, 1024, 4096)]
    assert times == sorted(times) and len(set(times)) == 4
    # A cached prefix is not computed, but the new tokens still attend to it.
    assert perf.prefill_ms(A100, 512, cached=3584) < perf.prefill_ms(A100, 4096)
    assert perf.prefill_ms(A100, 512, cached=3584) > perf.prefill_ms(A100, 512)


def test_a_bigger_batch_is_more_tokens_per_second_but_slower_steps() -> None:
    steps = {b: perf.step_ms(A100, b, b * 1000) for b in (1, 4, 16)}
    assert steps[1] < steps[4] < steps[16]  # each sequence waits longer for its token
    assert 1 / steps[1] < 4 / steps[4] < 16 / steps[16]  # the batch makes more of them


def test_decode_steps_inverts_decode_ms() -> None:
    for batch, context, steps in [(1, 0, 1.0), (8, 9000, 37.5), (32, 64000, 400.0)]:
        ms = perf.decode_ms(A100, batch, context, steps)
        assert perf.decode_steps(A100, batch, context, ms) == pytest.approx(steps)
    flat = ServingPerf(prefill_tokens_per_s=1.0, decode_base_ms=2.0)
    assert perf.decode_steps(flat, 3, 500, 10.0) == pytest.approx(5.0)


def test_a_model_without_a_table_falls_back_to_its_single_stream_rate() -> None:
    fallback = perf.fallback(100.0)
    assert fallback.decode_base_ms == pytest.approx(10.0)
    assert tg(fallback, 1) == pytest.approx(100.0, rel=0.001)
    assert perf.fallback(0.0).decode_base_ms == pytest.approx(1000 / perf.DEFAULT_TOKENS_PER_S)


# ---------------------------------------------------------------- batched workers
def cluster(workers: int = 1, slots: int = 16, kv_tokens: int = 0) -> SimCluster:
    """Llama-8b workers, one per A100 (80 GB, or room for `kv_tokens` of KV cache)."""
    model = CATALOG.get("llama-8b")
    assert model is not None
    spec = ClusterSpec(pools=1, workers_per_pool=workers, gpus_per_pool=workers, worker_slots=slots)
    if kv_tokens:
        vram = model.vram_required_bytes + kv_tokens * model.kv_bytes_per_token
        spec = dataclasses.replace(spec, gpu_vram_bytes=vram)
    built = SimCluster(spec, CATALOG, Config())
    built.build(["llama-8b"])
    return built


def arrival(
    job: int, at_ms: int = 0, prompt: int = 1024, output: int = 200, blocks: tuple[int, ...] = ()
) -> Arrival:
    return Arrival(at_ms, f"job-{job}", "llama-8b", "batch", None, prompt, output,
                   session_id="s" if blocks else None, prompt_block_ids=blocks)  # fmt: skip


def run(
    sim: SimCluster, arrivals: list[Arrival], worker: Callable[[int], str] | None = None
) -> int:
    """Dispatch each arrival at once (to `worker(i)`, else the first worker) and run to
    the end; returns how many events the cluster handled."""
    first = sorted(sim.workers)[0]
    heap: list[tuple[int, int, Arrival | Event]] = []
    order = itertools.count()
    for a in arrivals:
        heapq.heappush(heap, (a.at_ms, next(order), a))
    events = 0
    while heap:
        now, _, item = heapq.heappop(heap)
        if isinstance(item, Arrival):
            sim.arrive(item, now)
            target = worker(arrivals.index(item)) if worker else first
            later = sim.apply(Dispatch(item.job_id, target), now)
        else:
            events += 1
            later = sim.on(item, now)[1]
        for at, event in later:
            heapq.heappush(heap, (at, next(order), event))
    assert all(j.done_ms >= 0 for j in sim.jobs.values())
    return events


def tpot(job: SimJob) -> float:
    return (job.done_ms - job.first_token_ms) / (job.arrival.output_tokens - 1)


def test_batching_raises_throughput_but_slows_each_sequence() -> None:
    alone, batched = cluster(), cluster()
    run(alone, [arrival(0)])
    run(batched, [arrival(i) for i in range(8)])
    one = alone.jobs["job-0"]
    eight = list(batched.jobs.values())
    assert min(tpot(j) for j in eight) > tpot(one)
    makespan = max(j.done_ms for j in eight)
    assert 8 * 200 / makespan > 2 * (200 / one.done_ms)
    worker = next(iter(batched.workers.values()))
    assert worker.completed == 8 and worker.tokens == 8 * 200
    assert 0 < worker.busy_ms <= makespan


def test_ttft_grows_with_the_prompt_and_is_a_prefill_and_a_step() -> None:
    ttft = {}
    for prompt in (256, 1024, 4096):
        sim = cluster()
        run(sim, [arrival(0, prompt=prompt)])
        ttft[prompt] = sim.jobs["job-0"].first_token_ms
        expected = perf.prefill_ms(A100, prompt) + perf.step_ms(A100, 1, prompt)
        assert abs(ttft[prompt] - expected) <= 1  # whole ms
    assert ttft[256] < ttft[1024] < ttft[4096]


def test_workers_sharing_a_gpu_slow_each_other() -> None:
    shared = SimCluster(
        ClusterSpec(pools=1, workers_per_pool=2, gpus_per_pool=1), CATALOG, Config()
    )
    shared.build(["llama-8b"])
    apart = cluster(workers=2)
    for sim in (shared, apart):
        names = sorted(sim.workers)
        run(sim, [arrival(0), arrival(1)], worker=names.__getitem__)
    assert shared.jobs["job-0"].done_ms > 1.8 * apart.jobs["job-0"].done_ms


def test_a_prefix_hit_cuts_ttft() -> None:
    """A second turn finds its first turn's blocks on the worker that ran it."""
    first = tuple(range(8))  # 4,096 tokens
    second = (*first, 100, 101)
    warm, cold = cluster(), cluster()
    run(warm, [arrival(0, prompt=4096, blocks=first), arrival(1, 60_000, 5120, blocks=second)])
    run(cold, [arrival(1, 60_000, 5120, blocks=second)])
    hit, miss = warm.jobs["job-1"], cold.jobs["job-1"]
    assert (hit.cached_tokens, miss.cached_tokens) == (4096, 0)
    assert hit.first_token_ms - 60_000 < (miss.first_token_ms - 60_000) / 3
    # The policy's view: the core's index recorded both prompts and the session.
    assert warm.index.matched(sorted(warm.workers)[0], None, hit.job.block_hashes) == 10
    assert warm.index.session_worker(None, "s") == sorted(warm.workers)[0]


def test_kv_capacity_bounds_the_batch() -> None:
    """Room for three 1,224-token jobs: of six dispatched at once, three wait inside the
    worker (they hold slots) until one leaves."""
    sim = cluster(kv_tokens=4000)
    assert next(iter(sim.workers.values())).kv_tokens == 4000
    run(sim, [arrival(i, prompt=1024, output=200) for i in range(6)])
    jobs = list(sim.jobs.values())
    first_out = min(j.done_ms for j in jobs)
    assert sum(1 for j in jobs if j.first_token_ms < first_out) == 3
    assert all(j.dispatched_ms == 0 for j in jobs)


def test_running_jobs_pin_their_blocks_and_the_rest_go_lru() -> None:
    """Room for 5,000 tokens, prompts of four 512-token blocks, one after another."""
    a, b, c = (1, 2, 3, 4), (11, 12, 13, 14), (21, 22, 23, 24)
    sim = cluster(kv_tokens=5000)
    gap = 120_000
    run(sim, [
        arrival(0, 0 * gap, 2048, 10, a), arrival(1, 1 * gap, 2048, 10, b),
        # c needs 2,058 tokens with 904 free: the oldest blocks go, a's tail before its head.
        arrival(2, 2 * gap, 2048, 10, c),
        arrival(3, 3 * gap, 2048, 10, b), arrival(4, 4 * gap, 2048, 10, a),
    ])  # fmt: skip
    assert sim.jobs["job-3"].cached_tokens == 2047  # all of b (the last token is recomputed)
    assert sim.jobs["job-4"].cached_tokens == 512  # a's first block only

    pinned = cluster(kv_tokens=5000)
    run(pinned, [
        arrival(0, 0, 2048, 2000, a),  # holds 4,048 tokens while it runs
        arrival(1, 1000, 2048, 10, c),  # 2,058 more do not fit next to it: it waits
        arrival(2, gap, 2048, 10, a),
    ])  # fmt: skip
    running, waiting = pinned.jobs["job-0"], pinned.jobs["job-1"]
    assert waiting.dispatched_ms < running.done_ms < waiting.first_token_ms
    assert pinned.jobs["job-2"].cached_tokens == 2047  # a's blocks were never evicted


def test_a_job_too_big_for_the_cache_runs_alone() -> None:
    sim = cluster(kv_tokens=1000)
    run(sim, [arrival(0, prompt=2048, output=10), arrival(1, prompt=100, output=10)])
    big, small = sim.jobs["job-0"], sim.jobs["job-1"]
    assert big.done_ms < small.first_token_ms


def test_a_worker_leaving_admits_the_job_waiting_for_its_room_at_once() -> None:
    """Two workers share a GPU with room for 6,000 tokens of KV between them. A job too
    big for its worker's half runs alone; a second waits inside that worker for room.
    When the other worker goes, the share grows: the waiting job is admitted at that
    instant, and its end is reported when it comes, not when the big job's next event
    finds it done (the slot it held looked busy to the policy until then)."""
    model = CATALOG.get("llama-8b")
    assert model is not None
    vram = 2 * model.vram_required_bytes + 6000 * model.kv_bytes_per_token
    spec = ClusterSpec(pools=1, workers_per_pool=2, gpus_per_pool=1, gpu_vram_bytes=vram)
    sim = SimCluster(spec, CATALOG, Config())
    sim.build(["llama-8b"])
    first, other = sorted(sim.workers)
    assert sim.workers[first].kv_tokens < 3500
    steps: list[tuple[int, Arrival | Decision | Event]] = [
        (0, arrival(0, prompt=2000, output=3000)),  # 5,000 tokens: runs alone
        (10, arrival(1, 10, prompt=2000, output=10)),  # 2,010 more: waits
        (20, EvictWorker(other)),
    ]
    heap: list[tuple[int, int, Arrival | Decision | Event]] = []
    order = itertools.count()
    for at, item in steps:
        heapq.heappush(heap, (at, next(order), item))
    reported: dict[str, int] = {}  # job id -> when the cluster said it finished
    while heap:
        now, _, item = heapq.heappop(heap)
        if isinstance(item, Arrival):
            sim.arrive(item, now)
            later = sim.apply(Dispatch(item.job_id, first), now)
        elif isinstance(item, Event):
            if not sim.current(item):
                continue  # superseded, as the run loop drops it
            done, later = sim.on(item, now)
            reported |= {j.job.id: now for j in done}
        else:
            later = sim.apply(item, now)
        for at, event in later:
            heapq.heappush(heap, (at, next(order), event))
    big, waiting = sim.jobs["job-0"], sim.jobs["job-1"]
    gone_at = 20 + spec.evict_delay_ms
    assert big.admitted_ms == 0 and waiting.dispatched_ms == 10
    assert waiting.admitted_ms == gone_at < waiting.first_token_ms
    assert reported["job-1"] == waiting.done_ms < big.done_ms == reported["job-0"]


@pytest.mark.parametrize("output", [20, 2000])
def test_events_grow_with_jobs_not_with_tokens(output: int) -> None:
    """A worker's batch advances between changes without an event per step: a job
    costs a few events (in, prefilled, out, and the neighbours re-planned), whatever
    its length."""
    for jobs in (50, 200):
        sim = cluster(slots=jobs)  # never a job refused for want of a slot
        events = run(sim, [arrival(i, at_ms=i * 500, output=output) for i in range(jobs)])
        assert events <= 4 * jobs


# ---------------------------------------------------------------- the default cluster
def conversations(duration_s: float) -> SimSettings:
    """Five requests a second, 30% of them a conversation's next turn: prompts of about
    1,000 tokens on average, 200-400 tokens out, for three models on four A100s."""
    return SimSettings(
        rate=5.0, duration_s=duration_s, prompt_tokens="400-800", output_tokens="200-400",
        conversation=0.3, interactive=0.3, seed=7,
    )  # fmt: skip


async def test_the_default_cluster_keeps_up_with_conversations() -> None:
    report = await simulate(None, "platform", conversations(120.0))
    assert report.jobs_completed == report.jobs_submitted >= 500
    # Every job done within a minute of the last arrival: the queue did not grow.
    assert report.simulated_s < 180


@pytest.mark.slow
async def test_the_default_cluster_keeps_up_with_conversations_for_an_hour() -> None:
    report = await simulate(None, "platform", conversations(3600.0))
    assert report.jobs_completed == report.jobs_submitted >= 17_000
    assert report.simulated_s < 3600 + 60
