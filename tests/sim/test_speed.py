"""When the simulator runs a scheduling cycle: the cycles a workload takes (a cycle, a
round trip to a sandbox, is what a simulation's wall time goes to), and the live loop's
guarantees kept with fewer of them. Counts, never timings."""

from __future__ import annotations

from orchestrator.sim.run import MAX_CYCLES_PER_INSTANT, TICK_MS, default_catalog, simulate
from orchestrator.sim.settings import SimSettings
from tests.conftest import REPO

TRACE = REPO / "tests" / "data" / "traces" / "azure-llm-inference-2023-code.csv"
EXAMPLES = REPO / "schedulers" / "examples"
ONE_AT_A_TIME = (EXAMPLES / "runtime-7.1-simple-priority.lua").read_text()


async def test_an_idle_cluster_takes_one_cycle_per_arrival_instant() -> None:
    """Jobs that find a free slot: one cycle each when they come, none when they end
    (nothing waits) and no second cycle once the queue is empty."""
    # A deadline no loaded machine misses: a fallback's wait would be one more decision.
    settings = SimSettings(rate=1.0, duration_s=30.0, models="llama-8b", seed=3, deadline_ms=2000)
    instants = {a.at_ms for a in settings.arrivals(default_catalog())}
    report = await simulate(None, "platform", settings)
    assert report.jobs_completed == report.jobs_submitted > 20
    assert report.cycles == len(instants)
    assert report.decisions_by_action == {"dispatch": report.jobs_submitted}


async def test_a_policy_of_one_action_a_cycle_places_a_burst_at_once() -> None:
    """After a decision that acted, cycles go on at the same instant while a waiting job
    could be placed: twelve single dispatches at t=0, and not one cycle more."""
    # A deadline no loaded machine misses: the test counts the cycles the script decided.
    settings = SimSettings(rate=0.0, queue_depth=12, models="llama-8b", seed=2, deadline_ms=2000)
    report = await simulate(ONE_AT_A_TIME, "priority.lua", settings)
    assert report.jobs_completed == 12 and report.wait_ms["all"]["p99"] == 0.0
    assert report.cycles == 12 and report.decisions_by_source == {"user": 12}


async def test_a_burst_larger_than_the_cycle_cap_is_placed_at_once() -> None:
    """128 jobs queued at t=0 and 128 free slots (8 workers of 16): a policy of one
    dispatch a cycle places all of them at t=0. Only cycles that place nothing count
    against MAX_CYCLES_PER_INSTANT."""
    settings = SimSettings(rate=0.0, queue_depth=128, models="llama-8b", seed=2,
                           prompt_tokens="100-200", output_tokens="20-40",
                           deadline_ms=2000)  # fmt: skip
    assert MAX_CYCLES_PER_INSTANT < 128
    report = await simulate(ONE_AT_A_TIME, "priority.lua", settings)
    assert report.jobs_completed == 128 and report.wait_ms["all"]["p99"] == 0.0
    assert report.cycles == 128


FLAPS = """function schedule(ctx)
  local job = ctx.queue[1]
  if not job then return {action = "wait"} end
  for _, pool in ipairs(ctx.pools) do
    for _, w in ipairs(pool.workers) do
      if w.status == "ready" and w.slots_busy == 0 then
        return {action = "evict_worker", worker_id = w.id, reason = "flap"}
      end
    end
  end
  return {action = "start_worker", pool_id = "pool-1", gpu_id = 0, model_ref = job.model_ref}
end
"""


async def test_a_policy_that_starts_and_evicts_forever_with_no_delay_lets_time_pass() -> None:
    """With no start or evict delay, each start is ready and each eviction gone at the
    same instant, and each runs a cycle. The cycles that place nothing at one instant
    are capped over all its passes, then wait a tick: the run reaches its drain limit
    with no cycle budget, at most MAX_CYCLES_PER_INSTANT cycles a tick."""
    settings = SimSettings(pools=1, workers_per_pool=1, gpus_per_pool=1, rate=0.0,
                           queue_depth=1, models="llama-8b", start_delay_ms=0,
                           evict_delay_ms=0, drain_limit_s=1.0, deadline_ms=2000)  # fmt: skip
    report = await simulate(FLAPS, "flaps.lua", settings)
    assert report.unfinished["stopped"] == "drain_limit" and report.simulated_s == 1.0
    assert report.decisions_by_source == {"user": report.cycles}
    ticks = 1000 // TICK_MS + 1  # t=0 and each tick after it
    assert MAX_CYCLES_PER_INSTANT < report.cycles <= MAX_CYCLES_PER_INSTANT * ticks
    assert report.worker_starts >= MAX_CYCLES_PER_INSTANT // 2


async def test_waiting_jobs_get_a_cycle_every_tick_or_as_the_policy_asks() -> None:
    """While jobs wait, the policy is asked again TICK_MS after its last cycle (or after
    its wait's retry_after_ms, if sooner) until the drain limit."""
    settings = SimSettings(
        rate=0.0, queue_depth=3, models="llama-8b", drain_limit_s=2.0, deadline_ms=2000
    )
    waits = 'function schedule(ctx) return {action = "wait"} end\n'
    report = await simulate(waits, "wait.lua", settings)
    assert report.cycles == 1 + 2000 // TICK_MS
    asks = 'function schedule(ctx) return {action = "wait", retry_after_ms = 100} end\n'
    report = await simulate(asks, "retry.lua", settings)
    assert report.cycles == 1 + 2000 // 100


async def test_the_azure_trace_takes_under_one_and_a_fifth_cycles_per_request() -> None:
    """1,000 requests of the Azure code trace, as `make bench` replays it: fewer cycles
    than requests (one cycle places what arrived or finished together), where every
    change once ran one (3.75 a request)."""
    settings = SimSettings(
        trace=str(TRACE), trace_models="2048:llama-8b,8192:mistral-7b,inf:qwen-14b",
        tenants="a,b,c", trace_limit=1000,
    )  # fmt: skip
    report = await simulate(None, "platform", settings)
    assert report.jobs_completed == 1000
    assert report.cycles / report.jobs_submitted < 1.2
