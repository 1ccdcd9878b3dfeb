"""YAML policies: every condition and action, error messages, goldens, and the compiler's twin."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context, Job
from orchestrator.domain.prefix import PrefixState
from orchestrator.domain.samples import LLAMA_8B, GiB, sample_context
from orchestrator.policy.compile import compile_yaml
from orchestrator.policy.interpret import decide
from orchestrator.policy.parse import SELECTIONS, PolicyError, parse_policy, schema
from orchestrator.wire import decision as decision_codec
from tests.conftest import REPO, InProcessRuntime
from tests.slotted import running, slotted_context

SCHEDULERS = REPO / "schedulers"
GOLDEN = Path(__file__).parent / "golden"


def policy(*rules: str, name: str = "t") -> str:
    body = "".join(rules)
    return f"scheduler:\n  name: {name}\n  rules:\n{body}"


def rule(name: str, condition: str, action: str, priority: int = 0) -> str:
    return (
        f"    - name: {name}\n      condition: {condition}\n"
        f"      action: {action}\n      priority: {priority}\n"
    )


def run_lua(text: str, ctx: Context, language: str = "luajit") -> dict[str, object]:
    runtime = InProcessRuntime(language)
    reply = runtime.load(compile_yaml(text, "t.yaml"))
    assert reply.ok, reply.error.message
    result = runtime.run(ctx)
    assert result.error_kind == 0, (result.error_message, result.traceback)
    assert result.decision is not None
    return decisions.to_dict(decision_codec.from_proto(result.decision))


def both(text: str, ctx: Context | None = None) -> dict[str, object]:
    """The decision of the compiled Lua, checked equal to the Python interpreter's."""
    ctx = ctx or sample_context()
    lua = run_lua(text, ctx)
    expected = decide(parse_policy(text, "t.yaml"), ctx)
    assert expected is not None
    assert lua == decisions.to_dict(expected)
    return lua


# ---------------------------------------------------------------- conditions
# The sample queue in order: job-1 (interactive, llama-8b, seed 42), job-4
# (interactive, llama-70b), job-5 (batch, mistral), job-2 (batch, llama-13b),
# job-3 (batch, llama-8b, seed 7).
CONDITIONS = [
    ("always", "job-1"),
    ("{job.priority: batch}", "job-3"),  # job-5 and job-2 have no ready worker
    ("{job.priority: {eq: interactive}}", "job-1"),
    ("{job.priority: {ne: interactive}}", "job-3"),
    ("{job.seed: {exists: true}}", "job-1"),
    ("{job.seed: {exists: false}}", "job-4"),
    ("{job.id: {in: [job-3, job-4]}}", "job-4"),
    ("{job.id: {not_in: [job-1, job-4]}}", "job-3"),
    ("{job.seed: {gt: 10}}", "job-1"),
    ("{job.seed: {gte: 42}}", "job-1"),
    ("{job.seed: {lt: 42}}", "job-3"),
    ("{job.seed: {lte: 7}}", "job-3"),
    ("{job.wait_time_ms: {gt: 8s}}", "job-3"),
    ("{job.estimated_vram_bytes: {gte: 40GiB}}", "job-4"),
    ("{job.model_ref: {contains: Llama-3.1-8B}}", "job-3"),  # job-1 names it by alias
    ("{job.model_ref: {starts_with: llama-7}}", "job-4"),
    ("{model.family: llama, model.size: 70B}", "job-4"),
    ("{model.supports_determinism: true, job.priority: batch}", "job-3"),
    ("{all: [{job.priority: batch}, {job.seed: {exists: true}}]}", "job-3"),
    ("{any: [{job.id: job-4}, {job.id: job-3}]}", "job-4"),
    ("{not: {job.priority: interactive}}", "job-3"),
    ("{metrics.queue_depth: {gte: 5}, job.priority: interactive}", "job-1"),
    ("{worker.id: worker-1}", "job-1"),  # only worker-1 qualifies for llama-8b
    ("{pool.id: pool-2}", "job-1"),
    ("{gpu.device_name: NVIDIA A100, gpu.vram_total_bytes: {lt: 50GiB}}", "job-1"),
    ("{pool.vram_utilization: {gt: 0.4}}", "job-1"),  # pool-1 is 61/128 allocated
]


@pytest.mark.parametrize(("condition", "job_id"), CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_each_condition_selects_the_expected_job(condition: str, job_id: str) -> None:
    """Each operator and combinator picks the job it should, in Lua and in the interpreter."""
    text = policy(rule("r", condition, "{dispatch: {worker_selection: least-loaded}}"))
    decision = both(text)
    assert decision["action"] == "dispatch" and decision["job_id"] == job_id
    assert decision["rule"] == "r"


def test_metrics_condition_can_gate_everything() -> None:
    """A false metrics condition skips the rule; no rule acting means wait."""
    text = policy(rule("r", "{metrics.queue_depth: {gt: 100}}", "{dispatch: {}}"))
    assert both(text) == {"action": "wait", "reason": "no_rule_matched"}


def test_tenant_fields_and_quotas() -> None:
    """tenant.* reads the job's tenant; dispatches never break a quota."""
    ctx = sample_context(platform_mode=True)
    text = policy(rule("r", "{tenant.name: Acme Corp}", "{dispatch: {}}"))
    assert both(text, ctx)["job_id"] == "job-1"
    # tenant-2 is at its concurrency quota: its jobs are skipped even though they match.
    text = policy(rule("r", "{tenant.id: tenant-2}", "{dispatch: {}}"))
    assert both(text, ctx)["action"] == "wait"


# ---------------------------------------------------------------- actions
@pytest.mark.parametrize(
    ("selection", "worker_id"),
    [
        ("least-loaded", "worker-4"),
        ("most-vram-free", "worker-4"),
        ("ready", "worker-1"),
        ("round-robin", "worker-1"),
    ],
)
def test_dispatch_worker_selection(selection: str, worker_id: str) -> None:
    """Each worker_selection picks as its built-in does (llama-8b: worker-1 at 35%, worker-4 at 10%)."""
    text = policy(
        rule(
            "r",
            "{job.id: job-1}",
            f"{{dispatch: {{worker_selection: {selection}, model_match: required}}}}",
        )
    )
    assert both(text)["worker_id"] == worker_id


def test_wait_evict_start_and_platform_actions() -> None:
    """wait (with duration), evict by LRU/LFU/id, start_worker and use platform-scheduler."""
    assert both(policy(rule("w", "always", "{wait: {duration_ms: 250}}"))) == {
        "action": "wait",
        "retry_after_ms": 250,
        "reason": "rule w",
        "rule": "w",
    }
    assert (
        both(policy(rule("w", "{job.priority: interactive}", "{wait: null}")))["reason"]
        == "held by rule: job-1"
    )
    assert both(policy(rule("e", "always", "{evict: {policy: lru}}")))["worker_id"] == "worker-3"
    assert both(policy(rule("e", "always", "{evict: {policy: lfu}}")))["worker_id"] == "worker-4"
    assert both(policy(rule("e", "{pool.id: pool-1}", "{evict: {}}")))["worker_id"] == "worker-3"
    assert (
        both(policy(rule("e", "always", "{evict: {worker_id: worker-1}}")))["worker_id"]
        == "worker-1"
    )
    # job-5's mistral model has no worker: it is started on the GPU with the most free VRAM.
    started = both(policy(rule("s", "always", "{start_worker: {}}")))
    assert (started["action"], started["pool_id"], started["gpu_id"]) == (
        "start_worker",
        "pool-1",
        2,
    )
    started = both(
        policy(
            rule("s", "{gpu.vram_total_bytes: {lt: 50GiB}}", "{start_worker: {model: mistral-7b}}")
        )
    )
    assert (started["pool_id"], started["gpu_id"]) == ("pool-2", 0)
    assert (
        both(policy(rule("s", "always", "{start_worker: {model: llama-8b}}")))["action"] == "wait"
    )  # served
    delegated = run_lua(policy(rule("p", "always", "{use: platform-scheduler}")), sample_context())
    assert delegated["action"] == "batch"


def test_rules_run_by_priority_then_file_order() -> None:
    """Higher priority first; equal priorities keep their order in the file."""
    text = policy(
        rule("low", "{job.id: job-1}", "{dispatch: {}}", 1),
        rule("high", "{job.id: job-3}", "{dispatch: {}}", 10),
        rule("tie", "{job.id: job-4}", "{dispatch: {}}", 10),
    )
    assert both(text)["rule"] == "high"
    assert [r.name for r in parse_policy(text).rules] == ["high", "tie", "low"]


def test_spec_examples_compile_and_decide() -> None:
    """programmable-spec 3.2 and 6.2 compile as written and decide on the sample context."""
    text = (SCHEDULERS / "examples" / "programmable-3.2-determinism-first.yaml").read_text()
    assert run_lua(text, sample_context())["rule"] == "prioritize-seeded-jobs"
    text = (SCHEDULERS / "examples" / "programmable-6.2-batch-optimized.yaml").read_text()
    decision = both(text)
    assert (decision["job_id"], decision["worker_id"], decision["rule"]) == (
        "job-3",
        "worker-4",
        "batch-to-most-vram",
    )


def test_compiled_lua_runs_on_lua54_too() -> None:
    """The generated Lua is valid on both runtimes and decides the same."""
    text = (SCHEDULERS / "templates" / "gpu-affinity.yaml").read_text()
    assert run_lua(text, sample_context(), "lua54") == run_lua(text, sample_context(), "luajit")


# ---------------------------------------------------------------- errors
GOOD_RULE = "    - name: ok\n      condition: always\n      action: {dispatch: {}}\n"
MALFORMED = [
    ("scheduler:\n  name: x\n  rules: [\n", 4, "invalid YAML"),
    ("schedular:\n  name: x\n", 1, "unexpected key 'schedular'"),
    ("scheduler:\n  name: x\n", 1, "missing 'rules'"),
    ("scheduler:\n  name: x\n  rules: []\n", 3, "rules needs at least 1 item"),
    (
        "scheduler:\n  name: x\n  rules:\n    - condition: always\n      action: {dispatch: {}}\n",
        4,
        "missing 'name'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      action: {dispatch: {}}\n",
        4,
        "missing 'condition'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n",
        4,
        "missing 'action'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action: {dispatch: {}}\n      priorty: 3\n",
        7,
        "unexpected key 'priorty'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        job.prioity: batch\n      action: {dispatch: {}}\n",
        6,
        "unknown field 'job.prioity'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        jobs.priority: batch\n      action: {dispatch: {}}\n",
        6,
        "unexpected key 'jobs.priority'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action:\n        dispatch: {worker_selection: fastest}\n",
        7,
        "expected one of least-loaded, most-vram-free, round-robin, ready",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action:\n        dispatch: {worker_selection: prefix_affinity}\n",
        7,
        "expected one of least-loaded, most-vram-free, round-robin, ready, prefix-affinity, "
        "session-affinity (did you mean 'prefix-affinity'?)",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action: {dispatch_now: {}}\n",
        6,
        "unknown action 'dispatch_now' (expected one of dispatch, wait, evict",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        job.priority: {gt: 5}\n      action: {dispatch: {}}\n",
        6,
        "job.priority is a string; operator 'gt' does not apply",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        job.max_tokens: lots\n      action: {dispatch: {}}\n",
        6,
        "expected a number",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        job.estimated_vram_bytes: {gt: 16 gigs}\n      action: {dispatch: {}}\n",
        6,
        "expected a size like 16GiB",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        job.priority: urgent\n      action: {dispatch: {}}\n",
        6,
        "expected one of interactive, batch",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        job.priority: batch\n      action: {evict: {policy: lru}}\n",
        6,
        "action evict cannot use job fields",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n        any: [{job.seed: {exists: true}}, {worker.status: ready}]\n      action: {dispatch: {}}\n",
        6,
        "'any' mixes job/model fields with worker/pool/gpu fields",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n" + GOOD_RULE + GOOD_RULE,
        7,
        "the name is already used by rule #1",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action: {wait: {duration_ms: -5}}\n",
        6,
        "must be within 0..3600000",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action: {use: platform}\n",
        6,
        "expected 'platform-scheduler'",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: always\n      action: {dispatch: {}}\n      priority: high\n",
        7,
        "priority should be integer",
    ),
    (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition: sometimes\n      action: {dispatch: {}}\n",
        5,
        "condition",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_policy_errors_name_the_line(text: str, line: int, message: str) -> None:
    """Each malformed policy fails with file:line:column and what was expected."""
    with pytest.raises(PolicyError) as info:
        compile_yaml(text, "bad.yaml")
    error = info.value
    assert str(error).startswith(f"bad.yaml:{line}:"), str(error)
    assert message in str(error), str(error)


# ---------------------------------------------------------------- goldens
YAML_FILES = sorted(SCHEDULERS.rglob("*.yaml"))
POLICIES = [p for p in YAML_FILES if p.name != "scheduler-schema.yaml"]


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_compiled_output_matches_golden(path: Path) -> None:
    """The Lua compiled from each policy in schedulers/ is the reviewed golden file
    (UPDATE_GOLDEN=1 rewrites them)."""
    lua = compile_yaml(path.read_text(), path.name)
    golden = GOLDEN / (path.stem + ".lua")
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(lua)
    assert golden.read_text() == lua


# ---------------------------------------------------------------- the compiler's twin
FIELD_TESTS = st.sampled_from(
    [
        "job.priority: interactive",
        "job.priority: batch",
        "job.seed: {exists: true}",
        "job.seed: {exists: false}",
        "job.max_tokens: {gte: 50}",
        "job.wait_time_ms: {gt: 3000}",
        "job.tenant_id: {in: [tenant-1]}",
        "model.family: llama",
        "model.vram_required_bytes: {lt: 10GiB}",
        "model.supports_determinism: true",
        "metrics.queue_depth: {gt: 2}",
        "metrics.ready_workers: {lt: 3}",
        "tenant.concurrent_jobs: {lte: 2}",
        "job.model_ref: {contains: mistral}",
    ]
)
PLACE_TESTS = st.sampled_from(
    [
        "worker.jobs_completed: {gt: 10}",
        "pool.id: pool-2",
        "gpu.utilization_percent: {lt: 50}",
        "gpu.vram_total_bytes: {gte: 40GiB}",
        "pool.status: healthy",
        "worker.uptime_ms: {gt: 1h}",
        "worker.slots_busy: {lt: 2}",
    ]
)


@st.composite
def random_rule(draw: st.DrawFn, index: int) -> str:
    kind = draw(
        st.sampled_from(["dispatch", "dispatch", "wait", "evict", "start_worker", "start_model"])
    )
    job_tests = draw(st.lists(FIELD_TESTS, max_size=2, unique=True))
    place_tests = draw(st.lists(PLACE_TESTS, max_size=1))
    if kind == "dispatch":
        selection = draw(st.sampled_from(SELECTIONS))
        action = f"{{dispatch: {{worker_selection: {selection}}}}}"
    elif kind == "wait":
        action, place_tests = "{wait: {duration_ms: 100}}", []
    elif kind == "evict":
        action = f"{{evict: {{policy: {draw(st.sampled_from(['lru', 'lfu']))}}}}}"
        job_tests = [t for t in job_tests if t.startswith("metrics.")]
    elif kind == "start_worker":
        action = "{start_worker: {}}"
        place_tests = [t for t in place_tests if not t.startswith("worker.")]
    else:
        action = "{start_worker: {model: mistral-7b}}"
        place_tests = [t for t in place_tests if not t.startswith("worker.")]
    tests = job_tests + place_tests
    condition = "always" if not tests else "{" + ", ".join(tests) + "}"
    return rule(f"r{index}", condition, action, draw(st.integers(0, 3)))


# Two prompts' chained block hashes: a job's blocks are a prefix of one of them, and a
# worker holds any subset of all of them (the index may have lost a prompt's head).
CHAINS = ((101, 102, 103, 104), (201, 202, 203))
HASHES = tuple(h for chain in CHAINS for h in chain)


@st.composite
def prompt_of(draw: st.DrawFn, job: Job) -> Job:
    """`job` with a random seed, prompt blocks, token count (consistent with the blocks
    or not) and session worker (maybe one that is gone)."""
    chain = draw(st.sampled_from(((), *CHAINS)))
    return dataclasses.replace(
        job,
        seed=draw(st.sampled_from([None, 1, 99])),
        block_hashes=chain[: draw(st.integers(0, len(chain)))],
        prompt_tokens=draw(st.integers(0, 2500)),
        session_worker=draw(st.sampled_from([None, "worker-1", "worker-3", "worker-4", "gone"])),
    )


@st.composite
def prefix_state(draw: st.DrawFn, worker_ids: list[str]) -> PrefixState:
    held = {
        (worker_id, draw(st.sampled_from(["", "tenant-1"]))): draw(
            st.frozensets(st.sampled_from(HASHES))
        )
        for worker_id in worker_ids
    }
    return PrefixState(draw(st.sampled_from([16, 512])), MappingProxyType(held))


@st.composite
def random_context(draw: st.DrawFn) -> Context:
    ctx = sample_context(platform_mode=draw(st.booleans()))
    keep = draw(st.lists(st.sampled_from([j.id for j in ctx.queue]), unique=True))
    queue = tuple(draw(prompt_of(j)) for j in ctx.queue if j.id in keep)
    pools = []
    for pool in ctx.pools:
        # Slots in any combination with the status, consistent or not: the two sides
        # must agree on whatever a context says.
        workers = tuple(
            dataclasses.replace(w, status=draw(st.sampled_from(["ready", "busy", "failed"])),
                                current_job_id=None, last_used_at_ms=ctx.now_ms - draw(st.integers(0, 10**6)),
                                slots_total=draw(st.integers(1, 3)), slots_busy=draw(st.integers(0, 3)))
            for w in pool.workers
        )  # fmt: skip
        gpus = tuple(
            dataclasses.replace(g, utilization_percent=float(draw(st.integers(0, 100))),
                                vram_free_bytes=draw(st.integers(0, 40)) * GiB)
            for g in pool.gpus
        )  # fmt: skip
        status = draw(st.sampled_from(["healthy", "healthy", "degraded", "offline"]))
        pools.append(dataclasses.replace(pool, workers=workers, gpus=gpus, status=status))
    prefix = draw(prefix_state([w.id for p in pools for w in p.workers]))
    return dataclasses.replace(ctx, queue=queue, pools=tuple(pools), prefix=prefix)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 4).flatmap(lambda n: st.tuples(*(random_rule(i) for i in range(n)))),
    random_context(),
)
def test_compiled_lua_decides_like_the_interpreter(rules: tuple[str, ...], ctx: Context) -> None:
    """On random contexts, the compiled Lua in the sandbox and the pure-Python interpreter agree."""
    text = policy(*rules)
    expected = decide(parse_policy(text, "t.yaml"), ctx)
    assert expected is not None
    assert run_lua(text, ctx) == decisions.to_dict(expected)


# ---------------------------------------------------------------- slots (D27)
LEAST_LOADED = "{dispatch: {worker_selection: least-loaded}}"


@pytest.mark.parametrize(
    "condition", ["always", "{worker.jobs_completed: {gt: 0}}"], ids=["built-in", "pick"]
)
def test_least_loaded_is_the_smallest_share_of_slots_busy(condition: str) -> None:
    """worker-4's GPU is cooler, but half its slots are busy: job-1 goes to worker-1.
    The same through ctx.find_least_loaded_worker and through the compiled `pick`."""
    text = policy(rule("spread", condition, LEAST_LOADED))
    assert both(text, slotted_context(slots=4))["worker_id"] == "worker-4"
    assert both(text, slotted_context(slots=4, busy={"worker-4": 2}))["worker_id"] == "worker-1"


@pytest.mark.parametrize("selection", ["least-loaded", "most-vram-free", "ready", "round-robin"])
def test_every_selection_takes_a_worker_with_a_free_slot(selection: str) -> None:
    """worker-1 is full (busy); worker-4 runs three jobs but has a slot left."""
    ctx = slotted_context(slots=4, busy={"worker-1": 4, "worker-4": 3})
    for condition in ("always", "{worker.slots_total: {gte: 4}, worker.api: llamacpp}"):
        action = f"{{dispatch: {{worker_selection: {selection}}}}}"
        assert both(policy(rule("d", condition, action)), ctx)["worker_id"] == "worker-4"


def test_slot_fields_are_conditions_and_api_values_are_checked() -> None:
    """worker.slots_busy reads the worker's busy slots; an unknown API is refused."""
    ctx = slotted_context(slots=4, busy={"worker-4": 3})
    text = policy(rule("quiet", "{worker.slots_busy: {lt: 2}}", LEAST_LOADED))
    assert both(text, ctx)["worker_id"] == "worker-1"
    with pytest.raises(PolicyError, match="expected one of llamacpp, openai"):
        parse_policy(policy(rule("x", "{worker.api: vllm}", LEAST_LOADED)), "t.yaml")


# ---------------------------------------------------------------- prompt prefixes (issue 16)
def test_the_schema_and_the_compiler_offer_the_same_selections() -> None:
    """The schema's enum is the compiler's list, which the builder's menu shows."""
    dispatch = schema()["$defs"]["action"]["oneOf"][0]["properties"]["dispatch"]["oneOf"][1]
    assert tuple(dispatch["properties"]["worker_selection"]["enum"]) == SELECTIONS


PREFIX_AFFINITY = "{dispatch: {worker_selection: prefix-affinity}}"
SESSION_AFFINITY = "{dispatch: {worker_selection: session-affinity}}"
PROMPT = (11, 12, 13)


def cached(
    ctx: Context, held: dict[str, tuple[int, ...]], session_worker: str | None = None
) -> Context:
    """`ctx` with job-1's prompt three full blocks of 512 tokens, its session last on
    `session_worker`, and `held` the blocks each worker holds."""
    queue = tuple(
        dataclasses.replace(j, block_hashes=PROMPT, prompt_tokens=1536,
                            session_worker=session_worker)
        if j.id == "job-1" else j
        for j in ctx.queue
    )  # fmt: skip
    state = {(w, ""): frozenset(hashes) for w, hashes in held.items()}
    return dataclasses.replace(ctx, queue=queue, prefix=PrefixState(512, MappingProxyType(state)))


@pytest.mark.parametrize("condition", ["always", "{worker.slots_total: {gte: 1}}"])
def test_prefix_affinity_weighs_the_cached_share_against_the_busy_share(condition: str) -> None:
    """Score 3 x cached share - 4 x busy share. worker-1, two of four slots busy, holds
    all of job-1's prompt (1) and beats the idle worker-4 (0); holding one block of
    three (-1), it does not. With nothing cached, the smaller busy share wins, and on
    equal shares the lower id (not the cooler GPU, as least-loaded would)."""
    text = policy(rule("p", condition, PREFIX_AFFINITY))
    busy = slotted_context(slots=4, busy={"worker-1": 2})
    assert both(text, cached(busy, {"worker-1": PROMPT}))["worker_id"] == "worker-1"
    assert both(text, cached(busy, {"worker-1": PROMPT[:1]}))["worker_id"] == "worker-4"
    assert both(text, cached(busy, {}))["worker_id"] == "worker-4"
    assert both(text, cached(slotted_context(slots=4), {}))["worker_id"] == "worker-1"


def test_a_match_stops_at_the_first_block_a_worker_lacks() -> None:
    """worker-1 holds blocks 2 and 3 but not 1: no prefix of the prompt, no match."""
    text = policy(rule("p", "always", PREFIX_AFFINITY))
    ctx = cached(slotted_context(slots=4, busy={"worker-4": 1}), {"worker-1": PROMPT[1:]})
    assert both(text, ctx)["worker_id"] == "worker-1"  # the smaller busy share, not the cache
    ctx = cached(slotted_context(slots=4, busy={"worker-1": 1}), {"worker-1": PROMPT[1:]})
    assert both(text, ctx)["worker_id"] == "worker-4"


def test_session_affinity_keeps_a_session_on_its_worker_while_it_can() -> None:
    """job-1's session ran on worker-1: it goes back there though worker-4 is cooler;
    when worker-1 is full or gone, or the rule excludes it, least-loaded decides."""
    text = policy(rule("s", "always", SESSION_AFFINITY))
    free = slotted_context(slots=4)
    assert both(text, cached(free, {}, "worker-1"))["worker_id"] == "worker-1"
    full = slotted_context(slots=4, busy={"worker-1": 4})
    assert both(text, cached(full, {}, "worker-1"))["worker_id"] == "worker-4"
    assert both(text, cached(free, {}, "worker-9"))["worker_id"] == "worker-4"
    excluded = policy(rule("s", "{worker.id: {ne: worker-1}}", SESSION_AFFINITY))
    assert both(excluded, cached(free, {}, "worker-1"))["worker_id"] == "worker-4"


def test_prompt_fields_are_conditions() -> None:
    """job.prompt_tokens and job.prompt_blocks (a count: scripts never see the hashes)."""
    ctx = cached(sample_context(), {})
    for condition in ("{job.prompt_blocks: {gte: 3}}", "{job.prompt_tokens: {gt: 1000}}"):
        assert both(policy(rule("r", condition, PREFIX_AFFINITY)), ctx)["job_id"] == "job-1"
    decision = both(policy(rule("r", "{job.prompt_blocks: 0}", LEAST_LOADED)), ctx)
    assert decision["job_id"] == "job-4"  # the next in queue order, after job-1


def test_affinity_selections_decide_alike_on_lua54() -> None:
    """The compiled helpers' arithmetic gives the same choices on Lua 5.4 (integers and
    floats apart) as on LuaJIT (doubles only)."""
    text = (SCHEDULERS / "templates" / "cache-aware.yaml").read_text()
    busy = slotted_context(slots=4, busy={"worker-1": 2})
    for ctx in (cached(busy, {"worker-1": PROMPT}), cached(busy, {}, "worker-1")):
        assert run_lua(text, ctx, "lua54") == run_lua(text, ctx, "luajit")


@st.composite
def cache_context(draw: st.DrawFn) -> Context:
    """The slotted sample with a third llama-8b worker (worker-5, on worker-4's GPU, so
    that GPU load ties), random busy slots, prompts, sessions and cache contents: many
    candidates for every llama-8b job."""
    slots = draw(st.integers(1, 4))
    ctx = slotted_context(slots=slots, extra_jobs=draw(st.integers(0, 3)))
    pool_1, pool_2 = ctx.pools
    worker_5 = dataclasses.replace(pool_2.workers[0], id="worker-5")
    pools = tuple(
        dataclasses.replace(pool, workers=tuple(
            running(w, draw(st.integers(0, w.slots_total))) if w.model_ref == LLAMA_8B else w
            for w in workers
        ))
        for pool, workers in ((pool_1, pool_1.workers), (pool_2, (*pool_2.workers, worker_5)))
    )  # fmt: skip
    queue = tuple(draw(prompt_of(j)) for j in ctx.queue)
    prefix = draw(prefix_state([w.id for p in pools for w in p.workers]))
    return dataclasses.replace(ctx, queue=queue, pools=pools, prefix=prefix)


AFFINITY_RULE = st.tuples(
    st.sampled_from(["prefix-affinity", "session-affinity"]),
    st.sampled_from(["always", "{job.prompt_blocks: {gt: 0}}", "{job.priority: batch}",
                     "{worker.slots_busy: {lt: 2}}", "{gpu.utilization_percent: {lt: 50}}"]),
)  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(AFFINITY_RULE, min_size=1, max_size=3), cache_context())
def test_affinity_selections_decide_like_the_interpreter(
    rules: list[tuple[str, str]], ctx: Context
) -> None:
    """prefix-affinity and session-affinity, where most jobs have several candidates:
    the compiled Lua (ctx.prefix_match, ctx.session_worker) and the interpreter
    (domain/prefix.py) agree, ties and all."""
    text = policy(*(
        rule(f"r{i}", condition, f"{{dispatch: {{worker_selection: {selection}}}}}")
        for i, (selection, condition) in enumerate(rules)
    ))  # fmt: skip
    expected = decide(parse_policy(text, "t.yaml"), ctx)
    assert expected is not None
    assert run_lua(text, ctx) == decisions.to_dict(expected)
