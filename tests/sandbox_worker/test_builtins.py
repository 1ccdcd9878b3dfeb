"""Every ctx built-in (runtime-spec section 4) on the hand-made sample context, with known answers.

The sample context (orchestrator/domain/samples.py) is small enough to work the answers
out by hand; the comments say how. Each case runs on LuaJIT and on Lua 5.4.
"""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.domain.context import Gpu, Job
from orchestrator.domain.samples import (
    LLAMA_8B,
    LLAMA_13B,
    LLAMA_70B,
    MISTRAL_7B,
    NOW_MS,
    sample_context,
)
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.engine import platform_source
from orchestrator.scheduling.validation import (
    check_gpu_compatibility,
    check_job_fit,
    check_tenant_quota,
)
from tests.conftest import InProcessRuntime
from tests.slotted import LLAMA_WORKERS, slotted_context

GiB = 1024**3
IDS = "(function(list) local out = {} for i, x in ipairs(list) do out[i] = x.id end return out end)"
GPU_KEYS = "(function(list) local out = {} for i, g in ipairs(list) do out[i] = g.pool_id .. '/' .. g.id end return out end)"

# (expression, expected value); several return values come back as a list.
CASES = [
    # 3.1 queue: interactive first, then by arrival (job-1 waited 5 s, job-4 2 s;
    # batch: job-5 30 s, job-2 12 s, job-3 9 s).
    (f"{IDS}(ctx.queue)", ["job-1", "job-4", "job-5", "job-2", "job-3"]),
    ("ctx.get_job('job-2').priority", "batch"),
    ("ctx.get_job('nope')", None),
    (f"{IDS}(ctx.filter_jobs({{ priority = 'interactive' }}))", ["job-1", "job-4"]),
    (f"{IDS}(ctx.filter_jobs(function(j) return j.seed ~= nil end))", ["job-1", "job-3"]),
    ("ctx.queue[1].wait_time_ms", 5000),
    # 3.2 / 4.2 pools
    ("ctx.get_pool('pool-2').endpoint", "http://192.168.1.101:9200"),
    (f"{IDS}(ctx.filter_pools(function(p) return #p.gpus > 1 end))", ["pool-1"]),
    (f"{IDS}(ctx.get_all_workers())", ["worker-1", "worker-2", "worker-3", "worker-4"]),
    (f"{IDS}(ctx.find_workers_by_model('llama-8b'))", ["worker-1", "worker-4"]),
    (
        f"{IDS}(ctx.find_workers_by_model('hf:meta-llama/Llama-3.1-8B@main'))",
        ["worker-1", "worker-4"],
    ),
    ("ctx.refresh_pool_state()", False),
    (f"{IDS}(ctx.find_pools_with_capacity(40 * 1024^3))", ["pool-1"]),
    (f"{IDS}(ctx.find_pools_with_capacity(30 * 1024^3))", ["pool-1", "pool-2"]),
    ("ctx.is_pool_healthy('pool-1')", True),
    ("ctx.is_pool_healthy('nope')", False),
    ("ctx.get_pool_utilization('pool-1')", 61 / 128),  # (8+13+40) / (24+24+80) GiB
    ("ctx.get_pool_utilization('pool-2')", 0.2),
    ("ctx.pools[1].heartbeat_age_ms", 500),
    ("ctx.pools[1].workers[1].uptime_ms", 3_600_000),
    ("ctx.pools[1].gpus[1].vram_free_bytes", 16 * GiB),
    # 3.3 / 4.4 catalog
    ("ctx.resolve_model('llama-8b')", LLAMA_8B),
    ("ctx.resolve_model('hf:meta-llama/Llama-3.1-8B@main')", LLAMA_8B),
    ("ctx.resolve_model('unknown-model')", "unknown-model"),
    ("ctx.get_model('llama-13b').size", "13B"),
    ("ctx.get_model('hf:meta-llama/Llama-3.1-8B@main').model_ref", LLAMA_8B),
    ("ctx.model_exists('llama-70b')", True),
    ("ctx.model_exists('gpt-5')", False),
    ("ctx.catalog.aliases['mistral-7b']", MISTRAL_7B),
    (
        "(function(l) local o = {} for i, m in ipairs(l) do o[i] = m.size end return o end)"
        "(ctx.filter_models(function(m) return m.vram_required_bytes < 10 * 1024^3 end))",
        ["8B", "7B"],
    ),
    ("#ctx.find_models_by_family('llama')", 3),
    ("ctx.find_models_by_family('mistral')[1].model_ref", MISTRAL_7B),
    ("ctx.get_model_vram('llama-8b')", 8 * GiB),
    ("ctx.get_model_vram('gpt-5')", None),
    # 4.1 worker selection: worker-4's GPU is at 10 %, worker-1's at 35 %.
    (f"ctx.find_least_loaded_worker('{LLAMA_8B}').id", "worker-4"),
    (f"ctx.find_least_loaded_worker('{LLAMA_8B}', 'pool-1').id", "worker-1"),
    ("ctx.find_least_loaded_worker('llama-13b')", None),  # worker-2 is busy
    # worker-4's GPU has 32 GiB free, worker-1's 16 GiB.
    (f"ctx.find_most_vram_free_worker('{LLAMA_8B}').id", "worker-4"),
    ("ctx.find_ready_worker('llama-8b').id", "worker-1"),
    (
        "ctx.find_worker_round_robin('llama-8b').id, ctx.find_worker_round_robin('llama-8b').id,"
        " ctx.find_worker_round_robin('llama-8b').id",
        ["worker-1", "worker-4", "worker-1"],
    ),
    (
        f"{IDS}(ctx.filter_workers(function(w) return w.status == 'ready' end))",
        ["worker-1", "worker-3", "worker-4"],
    ),
    # 4.3 GPUs: pool-1 GPU 2 has 40 GiB free, pool-2 GPU 0 has 32.
    (f"{GPU_KEYS}(ctx.find_gpus_with_vram(20 * 1024^3))", ["pool-1/2", "pool-2/0"]),
    ("ctx.get_gpu('pool-1', 2).device_name", "NVIDIA A100"),
    ("ctx.get_gpu('pool-1', 9)", None),
    (
        "ctx.check_gpu_compatibility(ctx.get_gpu('pool-1', 0), 'llama-70b')",
        [False, "insufficient_vram"],
    ),
    ("ctx.check_gpu_compatibility(ctx.get_gpu('pool-1', 2), 'llama-70b')", [True, None]),
    ("ctx.check_gpu_compatibility(ctx.get_gpu('pool-1', 2), 'gpt-5')", [False, "unknown_model"]),
    (f"ctx.estimate_performance('{LLAMA_8B}', ctx.get_gpu('pool-1', 0))", 90),
    (f"ctx.estimate_performance('{LLAMA_8B}', ctx.get_gpu('pool-1', 2))", 120),
    (f"ctx.estimate_performance('{LLAMA_8B}', {{ device_name = 'NVIDIA A100-SXM4-80GB' }})", 120),
    (f"ctx.estimate_performance('{LLAMA_8B}', {{ device_name = 'Tesla T4' }})", 45),
    # 4.5 jobs: 100 tokens at the default 45 tok/s; worker-1 measures 85.3 tok/s.
    ("ctx.calculate_wait_time(ctx.get_job('job-1'))", 5000),
    ("ctx.estimate_job_duration(ctx.get_job('job-1'))", 2222),
    ("ctx.estimate_job_duration(ctx.get_job('job-1'), ctx.get_pool('pool-1').workers[1])", 1173),
    ("ctx.can_job_fit(ctx.get_job('job-1'), ctx.get_pool('pool-1').workers[1])", [True, None]),
    (
        "ctx.can_job_fit(ctx.get_job('job-2'), ctx.get_pool('pool-1').workers[2])",
        [False, "worker_not_ready"],
    ),
    (
        "ctx.can_job_fit(ctx.get_job('job-1'), ctx.get_pool('pool-1').workers[3])",
        [False, "model_mismatch"],
    ),
    ("ctx.can_job_fit(ctx.get_job('job-1'), nil)", [False, "no_worker"]),
    ("ctx.get_job_priority_score(ctx.get_job('job-1'))", 1005),
    ("ctx.get_job_priority_score(ctx.get_job('job-2'))", 112),
    # 4.6 quotas (tenants only in platform mode; nil tenant means home/lab)
    ("ctx.check_tenant_quota(nil, ctx.get_job('job-1'))", [True, None]),
    ("ctx.get_tenant_usage('tenant-1')", None),
    ("ctx.estimate_quota_impact(nil, ctx.get_job('job-4'))", 40 * GiB),
    # 4.7 eviction: idle workers last used 20 s (1), 600 s (3), 5 s (4) ago;
    # jobs per hour of uptime: 42 (1), 6 (3), 5 (4).
    ("ctx.find_worker_to_evict_lru().id", "worker-3"),
    ("ctx.find_worker_to_evict_lru('pool-2').id", "worker-4"),
    ("ctx.find_worker_to_evict_lfu().id", "worker-4"),
    ("ctx.should_evict('pool-1')", [False, 0]),
    ("ctx.find_model_to_evict('pool-1')", MISTRAL_7B),  # cached, and no worker serves it
    ("ctx.find_model_to_evict('pool-2')", None),
    # 4.8 utilities
    ("ctx.now()", NOW_MS),
    (f"ctx.elapsed_since({NOW_MS - 100})", 100),
    ("ctx.average({10, 20, 30})", 20),
    ("ctx.max({10, 20, 30})", 30),
    ("ctx.min({10, 20, 30})", 10),
    ("ctx.average({})", None),
    ("ctx.string_contains('llama-8b', 'llama')", True),
    ("ctx.string_contains('a.b', '.')", True),
    ("ctx.string_contains('ab', '.')", False),
    ("ctx.string_starts_with('hf:meta-llama', 'hf:')", True),
    ("ctx.string_starts_with('hf:meta-llama', 'meta')", False),
    # 3.5 / 3.6
    ("ctx.metrics.queue_depth", 5),
    ("ctx.metrics.ready_workers", 3),
    ("ctx.metrics.timestamp_ms", NOW_MS),
    ("ctx.config.eviction.vram_threshold", 0.9),
    ("ctx.config.retry.max_attempts", 5),
    ("ctx.config.deployment_mode", "lab"),
    # 4.9 and the older spec's names
    ("ctx.get_platform_scheduler_source():sub(1, 16)", "-- platform.lua:"),
    (f"ctx.find_worker_most_vram_free('{LLAMA_8B}').id", "worker-4"),
    (f"ctx.helpers.find_worker('{LLAMA_8B}').id", "worker-4"),
    (f"ctx.helpers.find_worker_most_vram_free('{LLAMA_8B}').id", "worker-4"),
    ("ctx.helpers.calculate_wait_time('job-1')", 5000),
    ("ctx.helpers.get_model('llama-8b').family", "llama"),
]


@pytest.mark.parametrize(("expression", "expected"), CASES, ids=[c[0][:60] for c in CASES])
def test_builtin_answers(lua: InProcessRuntime, expression: str, expected: object) -> None:
    """Each built-in returns the hand-computed answer on the sample context."""
    value = lua.eval(expression)
    if isinstance(expected, float):
        assert value == pytest.approx(expected)
    else:
        assert value == expected


PLATFORM_CASES = [
    # tenant-1: 5/10 jobs, 32+8 <= 48 GiB, 450,000+100 <= 1,000,000 tokens.
    ("ctx.check_tenant_quota('tenant-1', ctx.get_job('job-1'))", [True, None]),
    # tenant-2 already runs its one allowed job.
    (
        "ctx.check_tenant_quota('tenant-2', ctx.get_job('job-2'))",
        [False, "quota_exceeded", "concurrent_jobs"],
    ),
    ("ctx.check_tenant_quota('tenant-9', ctx.get_job('job-2'))", [False, "unknown_tenant"]),
    ("ctx.get_tenant_usage('tenant-1').concurrent_jobs", 5),
    ("ctx.get_tenant_usage('tenant-9')", None),
    ("ctx.estimate_quota_impact('tenant-1', ctx.get_job('job-1'))", 8 * GiB),
    ("ctx.tenants['tenant-2'].name", "Globex"),
    ("ctx.helpers.check_quota('tenant-1', 1024)", [True, None]),
    ("ctx.config.deployment_mode", "platform"),
]


@pytest.mark.parametrize(
    ("expression", "expected"), PLATFORM_CASES, ids=[c[0][:60] for c in PLATFORM_CASES]
)
def test_quota_builtins_in_platform_mode(
    lua: InProcessRuntime, expression: str, expected: object
) -> None:
    """Quota built-ins answer per tenant on the platform-mode sample context."""
    assert lua.eval(expression, sample_context(platform_mode=True)) == expected


def test_tokens_and_vram_quotas(lua: InProcessRuntime) -> None:
    """The VRAM and daily-token quotas are checked, and say which one failed."""
    ctx = sample_context(platform_mode=True)
    tenant_2 = dataclasses.replace(ctx.tenants[1], quota_max_concurrent_jobs=None)
    ctx = dataclasses.replace(ctx, tenants=(ctx.tenants[0], tenant_2))
    # job-2 needs 13 GiB on top of 13 GiB used, against a 16 GiB quota.
    assert lua.eval("ctx.check_tenant_quota('tenant-2', ctx.get_job('job-2'))", ctx) == [
        False,
        "quota_exceeded",
        "vram",
    ]
    tenant_2 = dataclasses.replace(tenant_2, quota_vram_bytes=None)
    ctx = dataclasses.replace(ctx, tenants=(ctx.tenants[0], tenant_2))
    # 99,950 + 100 tokens > 100,000.
    assert lua.eval("ctx.check_tenant_quota('tenant-2', ctx.get_job('job-2'))", ctx) == [
        False,
        "quota_exceeded",
        "tokens_daily",
    ]


def test_compute_capability_and_vram_fit(lua: InProcessRuntime) -> None:
    """A GPU below the model's compute capability, and a worker too small for a job, are refused."""
    ctx = sample_context()
    pool_1 = ctx.pools[0]
    old_gpu = dataclasses.replace(pool_1.gpus[2], compute_capability="7.0")
    small = dataclasses.replace(pool_1.workers[0], vram_bytes=1 * GiB)
    ctx = dataclasses.replace(
        ctx,
        pools=(
            dataclasses.replace(
                pool_1, gpus=(*pool_1.gpus[:2], old_gpu), workers=(small, *pool_1.workers[1:])
            ),
            ctx.pools[1],
        ),
    )
    assert lua.eval("ctx.check_gpu_compatibility(ctx.get_gpu('pool-1', 2), 'llama-70b')", ctx) == [
        False,
        "compute_capability_too_low",
    ]
    assert lua.eval(
        "ctx.can_job_fit(ctx.get_job('job-1'), ctx.get_pool('pool-1').workers[1])", ctx
    ) == [False, "insufficient_vram"]


def test_should_evict_over_threshold(lua: InProcessRuntime) -> None:
    """should_evict reports the bytes allocated beyond the VRAM threshold."""
    ctx = sample_context()
    pool_2 = ctx.pools[1]
    full = dataclasses.replace(
        pool_2.gpus[0], vram_allocated_bytes=38 * GiB, vram_free_bytes=2 * GiB
    )
    ctx = dataclasses.replace(ctx, pools=(ctx.pools[0], dataclasses.replace(pool_2, gpus=(full,))))
    needed, over = lua.eval("ctx.should_evict('pool-2')", ctx)
    assert needed is True
    assert over == 38 * GiB - int(0.9 * 40 * GiB)


def test_platform_schedule_matches_platform_scheduler(lua: InProcessRuntime) -> None:
    """ctx.platform_schedule(ctx) and the global platform.schedule return the platform's decision."""
    batch = lua.eval("ctx.platform_schedule(ctx)")
    assert batch["action"] == "batch"
    assert [a["action"] for a in batch["actions"]] == ["dispatch"] * 3 + ["start_worker"]
    assert lua.eval("platform.schedule(ctx)") == batch


def test_logs_and_metrics_are_returned_with_quotas() -> None:
    """ctx.log_* and ctx.emit_metric come back in the result; beyond the quota they are counted."""
    runtime = InProcessRuntime("luajit", SandboxLimits(max_log_records=3, max_metrics=2))
    runtime.load(
        """
        function schedule(ctx)
          ctx.log_debug("d"); ctx.log_info("i", 1); ctx.log_warn("w"); ctx.log_error("e")
          ctx.emit_metric("custom_a", 1.5); ctx.emit_metric("custom_b", 2); ctx.emit_metric("custom_c", 3)
          return { action = "wait" }
        end"""
    )
    result = runtime.run(sample_context())
    assert result.logs == [("debug", "d"), ("info", "i 1"), ("warn", "w")]
    assert result.logs_dropped == 1
    assert result.metrics == [("custom_a", 1.5), ("custom_b", 2.0)]
    assert result.metrics_dropped == 1


def test_emit_metric_rejects_bad_names(lua: InProcessRuntime) -> None:
    """A metric name outside the Prometheus alphabet is a clear script error."""
    result = lua.error_of(
        'function schedule(ctx) ctx.emit_metric("bad name!", 1) return {action="wait"} end'
    )
    assert "metric name must match" in result.error_message


def test_argument_errors_name_the_builtin(lua: InProcessRuntime) -> None:
    """Calling a built-in with a wrong argument type names the function and the argument."""
    result = lua.error_of("function schedule(ctx) return ctx.get_job(nil) end")
    assert "ctx.get_job: argument #1 must be a string, got nil" in result.error_message


def test_python_twins_agree_with_lua(lua: InProcessRuntime) -> None:
    """The validator's quota, compatibility and fit checks give the built-ins' answers."""
    ctx = sample_context(platform_mode=True)
    for tenant in ("tenant-1", "tenant-2"):
        for job in ctx.queue:
            ok, reason, detail = check_tenant_quota(ctx.tenants_by_id[tenant], job)
            lua_answer = lua.eval(
                f"ctx.check_tenant_quota('{tenant}', ctx.get_job('{job.id}'))", ctx
            )
            assert lua_answer[:2] == [ok, reason]
            if detail:
                assert lua_answer[2] == detail
    for pool in ctx.pools:
        for gpu in pool.gpus:
            for ref in (LLAMA_8B, LLAMA_13B, LLAMA_70B, MISTRAL_7B, "gpt-5"):
                expected = list(check_gpu_compatibility(gpu, ctx.catalog.get(ref)))
                expression = (
                    f"ctx.check_gpu_compatibility(ctx.get_gpu('{pool.id}', {gpu.id}), '{ref}')"
                )
                assert lua.eval(expression, ctx) == expected
    for job in ctx.queue:
        for pool in ctx.pools:
            for i, worker in enumerate(pool.workers):
                expected = list(check_job_fit(ctx, job, worker))
                expression = f"ctx.can_job_fit(ctx.get_job('{job.id}'), ctx.get_pool('{pool.id}').workers[{i + 1}])"
                assert lua.eval(expression, ctx) == expected


def test_catalog_tokens_per_sec_matches_lua(lua: InProcessRuntime) -> None:
    """Device-name matching for performance estimates is the same in Python and Lua."""
    ctx = sample_context()
    model = ctx.catalog.get(LLAMA_8B)
    assert model is not None
    for name in ("NVIDIA RTX 4090", "NVIDIA A100-SXM4-80GB", "Tesla T4"):
        gpu = Gpu(0, device_name=name, vram_total_bytes=GiB)
        assert lua.eval(
            f"ctx.estimate_performance('{LLAMA_8B}', {{ device_name = '{name}' }})"
        ) == (model.tokens_per_sec(gpu.device_name))


def test_job_records_are_read_only_and_complete(lua: InProcessRuntime) -> None:
    """A queued job has every runtime-spec 3.1 field, iterates with pairs, and refuses writes."""
    fields = lua.eval(
        "(function() local t = {} for k, v in pairs(ctx.queue[1]) do t[k] = v end return t end)()"
    )
    expected = {f.name for f in dataclasses.fields(Job)} | {"wait_time_ms", "prompt_blocks"}
    # tenant_id is nil in lab mode; the block hashes and the session's worker serve the
    # prefix built-ins, and a script sees the count of blocks instead (D29).
    assert set(fields) == expected - {"tenant_id", "block_hashes", "session_worker"}
    assert fields["seed"] == 42
    result = lua.error_of("function schedule(ctx) ctx.queue[1].priority = 'batch' end")
    assert "ctx is read-only" in result.error_message
    for attempt in (
        "rawset(ctx.queue[1], 'x', 1)",
        "table.insert(ctx.queue[1], 1)",
        "setmetatable(ctx.queue[1], {})",
    ):
        result = lua.error_of(f"function schedule(ctx) {attempt} end")
        assert result.error_message, attempt


def test_platform_source_is_the_shipped_file() -> None:
    """get_platform_scheduler_source returns schedulers/platform.lua byte for byte."""
    runtime = InProcessRuntime("luajit")
    source = runtime.eval("ctx.get_platform_scheduler_source()")
    assert source == platform_source()


# ---------------------------------------------------------------- slots (D27)
def test_workers_carry_their_slots(lua: InProcessRuntime) -> None:
    """slots_total, slots_busy, active_job_ids (an array, oldest first) and api reach
    the script; a worker of the spec has one slot and speaks llama.cpp."""
    ctx = slotted_context(slots=4, busy={"worker-1": 2})
    expression = (
        "(function(w) return {w.slots_total, w.slots_busy, w.active_job_ids, w.api,"
        " w.current_job_id, w.status} end)(ctx.get_pool('pool-1').workers[1])"
    )
    assert lua.eval(expression, ctx) == [
        4, 2, ["run-worker-1-0", "run-worker-1-1"], "llamacpp", "run-worker-1-0", "ready",
    ]  # fmt: skip
    spec = "(function(w) return {w.slots_total, w.slots_busy, #w.active_job_ids, w.api} end)"
    assert lua.eval(f"{spec}(ctx.get_pool('pool-1').workers[3])") == [1, 0, 0, "llamacpp"]
    assert lua.eval(f"{spec}(ctx.get_pool('pool-1').workers[2])") == [1, 1, 1, "llamacpp"]


def test_least_loaded_is_the_smallest_share_of_slots_busy_first(lua: InProcessRuntime) -> None:
    """worker-4's GPUs are less utilized, but half its slots are busy: worker-1 wins.
    A full worker is no candidate, a worker with a free slot is."""
    free = slotted_context(slots=4)
    assert lua.eval(f"ctx.find_least_loaded_worker('{LLAMA_8B}').id", free) == "worker-4"
    half = slotted_context(slots=4, busy={"worker-4": 2})
    assert lua.eval(f"ctx.find_least_loaded_worker('{LLAMA_8B}').id", half) == "worker-1"
    full = slotted_context(slots=4, busy={"worker-1": 4, "worker-4": 3})
    assert lua.eval(f"ctx.find_least_loaded_worker('{LLAMA_8B}').id", full) == "worker-4"
    assert lua.eval(f"{IDS}(ctx.find_workers_by_model('{LLAMA_8B}'))", full) == list(LLAMA_WORKERS)
    assert lua.eval(f"ctx.find_ready_worker('{LLAMA_8B}').id", full) == "worker-4"


def test_eviction_built_ins_skip_a_worker_running_a_job_in_any_slot(
    lua: InProcessRuntime,
) -> None:
    """worker-4 is the least frequently used, and pool-2's only worker; running one job
    in one of its four slots, it is neither's answer."""
    ctx = slotted_context(slots=4, busy={"worker-4": 1})
    assert lua.eval("ctx.find_worker_to_evict_lfu().id", ctx) == "worker-3"
    assert lua.eval("ctx.find_worker_to_evict_lru('pool-2')", ctx) is None


def test_python_twin_of_can_job_fit_agrees_with_slots(lua: InProcessRuntime) -> None:
    """check_job_fit and ctx.can_job_fit agree on free, partly busy, full, and
    inconsistent (ready but full) slotted workers."""
    ctx = slotted_context(slots=2, busy={"worker-1": 2, "worker-4": 1}, extra_jobs=1)
    pool_1 = ctx.pools[0]
    ready_but_full = dataclasses.replace(pool_1.workers[0], id="worker-x", status="ready")
    ctx = dataclasses.replace(
        ctx, pools=(dataclasses.replace(pool_1, workers=(*pool_1.workers, ready_but_full)),
                    ctx.pools[1]),
    )  # fmt: skip
    answers = set()
    for job in ctx.queue:
        for pool in ctx.pools:
            for i, worker in enumerate(pool.workers):
                expected = list(check_job_fit(ctx, job, worker))
                expression = f"ctx.can_job_fit(ctx.get_job('{job.id}'), ctx.get_pool('{pool.id}').workers[{i + 1}])"
                assert lua.eval(expression, ctx) == expected, (job.id, worker.id)
                answers.add(tuple(expected))
    assert (False, "worker_not_ready") in answers and (True, None) in answers
