"""Fuzzing: the YAML compiler, the decision validator, and a real sandbox worker fed
malformed, oversized and ill-typed protobuf. Time-bounded here; `make fuzz` runs the
same properties with FUZZ_SCALE examples per case times more."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestrator._proto import context_pb2, sandbox_pb2, sandbox_pb2_grpc
from orchestrator.domain.decision import Batch, Decision, Dispatch, EvictWorker, StartWorker, Wait
from orchestrator.domain.samples import sample_context
from orchestrator.policy.compile import compile_yaml
from orchestrator.policy.parse import PolicyError
from orchestrator.sandbox.limits import GRPC_MESSAGE_OPTIONS, SandboxLimits
from orchestrator.scheduling.engine import platform_source
from orchestrator.scheduling.validation import validate
from orchestrator.wire import context as snapshot
from tests.conftest import InProcessRuntime

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# ---------------------------------------------------------------- the YAML compiler
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "job.priority",
            "interactive",
            "16GiB",
            "5s",
            "gt",
            "all",
            "any",
            "not",
            "dispatch",
            "least-loaded",
        ]
    ),
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "condition",
                    "action",
                    "priority",
                    "name",
                    "rules",
                    "dispatch",
                    "worker_selection",
                    "wait",
                    "duration_ms",
                    "evict",
                    "use",
                    "job.priority",
                    "metrics.queue_depth",
                    "all",
                    "any",
                    "not",
                    "in",
                    "gt",
                    "start_worker",
                    "model_match",
                    "x",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=25,
)
RUNTIME = InProcessRuntime("luajit")
CTX = sample_context(platform_mode=True)


def _compiles_or_refuses(text: str) -> None:
    try:
        lua = compile_yaml(text, "fuzz.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.yaml"), exc  # errors name the file
        return
    reply = RUNTIME.load(lua)
    assert reply.ok, (reply.error, lua)  # whatever compiles, loads


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True)
)


@fuzz(150)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
@example("!0")  # an unknown tag (found by this test in CI)
@example("&a [*a]")  # an alias inside itself
@example("{? [a]: 1}")  # a key that is not a name
@example(BOMB)  # a billion laughs: 10^6 nodes once expanded
def test_compiler_on_arbitrary_text(text: str) -> None:
    """Any text either compiles to Lua that loads, or fails with an error naming the file."""
    _compiles_or_refuses(text)


@fuzz(300)
@given(st.lists(documents, max_size=5), st.text(max_size=12))
def test_compiler_on_policy_shaped_documents(rules: list[object], name: str) -> None:
    """Policy-shaped documents with wrong types, missing and unknown keys: the same."""
    doc = {"scheduler": {"name": name or "f", "rules": rules}}
    _compiles_or_refuses(yaml.safe_dump(doc))


# Mostly valid rules (fields, operators and actions of the schema, hostile strings in
# the values, an odd key now and then), so that most of them compile and the Lua
# they compile to is what gets exercised.
FIELDS = [
    "job.priority",
    "job.tenant_id",
    "job.wait_time_ms",
    "job.seed",
    "job.model_ref",
    "job.max_tokens",
    "model.vram_required_bytes",
    "metrics.queue_depth",
    "worker.status",
    "pool.status",
    "gpu.vram_total_bytes",
    "tenant.concurrent_jobs",
]
hostile = st.sampled_from(
    [
        '"; os.exit() --',
        "]]..os.exit()..[[",
        "\\",
        "\n",
        "--[[",
        "16GiB",
        "5s",
        "x" * 300,
        "é\u2028",
        "interactive",
    ]
)
values = st.one_of(
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    hostile,
    st.text(max_size=10),
)
operators = st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "contains", "starts_with"])
comparisons = st.one_of(
    values,
    st.dictionaries(operators, values, min_size=1, max_size=2),
    st.fixed_dictionaries({"in": st.lists(values, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"exists": st.booleans()}),
)
leaf_conditions = st.one_of(
    st.just("always"),
    st.dictionaries(
        st.sampled_from(FIELDS) | st.text(max_size=6), comparisons, min_size=1, max_size=2
    ),
)
conditions = st.recursive(
    leaf_conditions,
    lambda inner: (
        st.fixed_dictionaries({"all": st.lists(inner, min_size=1, max_size=3)})
        | st.fixed_dictionaries({"any": st.lists(inner, min_size=1, max_size=3)})
        | st.fixed_dictionaries({"not": inner})
    ),
    max_leaves=6,
)
policy_actions = st.one_of(
    st.fixed_dictionaries(
        {
            "dispatch": st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "worker_selection": st.sampled_from(
                            [
                                "least-loaded",
                                "most-vram-free",
                                "round-robin",
                                "ready",
                                "fastest",
                                "prefix-affinity",
                                "session-affinity",
                            ]
                        ),
                        "model_match": st.just("required"),
                    },
                ),
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "wait": st.one_of(
                st.none(), st.fixed_dictionaries({"duration_ms": st.integers(-5, 4_000_000)})
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "evict": st.fixed_dictionaries(
                {}, optional={"policy": st.sampled_from(["lru", "lfu"]), "worker_id": hostile}
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "start_worker": st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "model": st.sampled_from(["llama-8b", "nope"]) | hostile,
                        "pool_id": hostile,
                    },
                ),
            )
        }
    ),
    st.just({"use": "platform-scheduler"}),
)
rules = st.fixed_dictionaries(
    {
        "name": hostile | st.text(min_size=1, max_size=10),
        "condition": conditions,
        "action": policy_actions,
    },
    optional={"priority": st.integers(-1000, 1000)},
)


@fuzz(300)
@given(st.lists(rules, min_size=1, max_size=5))
# Found by this test: control characters were written as JSON's \u001f, not Lua.
@example([{"name": "\x1f", "condition": "always", "action": {"dispatch": None}}])
def test_compiler_on_mostly_valid_policies(policy_rules: list[dict[str, object]]) -> None:
    """Mostly valid policies with hostile strings compile to Lua that loads and runs
    to a decision (or a clean Lua error), with no way to smuggle code through a value."""
    text = yaml.safe_dump({"scheduler": {"name": "fuzz", "rules": policy_rules}})
    try:
        lua = compile_yaml(text, "fuzz.yaml")
    except PolicyError:
        return
    assert RUNTIME.load(lua).ok
    result = RUNTIME.run(CTX)
    assert result.error_kind in (0, sandbox_pb2.ERROR_KIND_LUA_ERROR), result.error_message
    assert "os.exit is disabled" not in result.error_message


# ---------------------------------------------------------------- the decision validator
ids = st.sampled_from([j.id for j in CTX.queue] + ["worker-1", "", "x" * 10_000, "\x00"])
workers = st.sampled_from(["worker-1", "worker-2", "worker-3", "worker-4", "nope", ""])
actions: st.SearchStrategy[Decision] = st.one_of(
    st.builds(Dispatch, ids, workers),
    st.builds(Wait, st.one_of(st.none(), st.integers(-(2**63), 2**63))),
    st.builds(
        StartWorker,
        st.sampled_from(["pool-1", "pool-2", "x"]),
        st.integers(-(2**31), 2**31),
        st.sampled_from(["llama-8b", "nope", ""]),
    ),
    st.builds(EvictWorker, workers),
)
decisions = st.one_of(
    actions,
    st.builds(Batch, st.lists(st.one_of(actions, st.builds(Batch)), max_size=12).map(tuple)),
)


@fuzz(1000)
@given(decisions)
def test_validator_never_raises_and_accepts_only_sound_decisions(decision: Decision) -> None:
    """Any decision gets a verdict; an accepted one dispatches queued jobs once each to
    distinct ready workers and never nests batches."""
    verdict = validate(decision, CTX)
    if not verdict.ok:
        return
    flat = decision.actions if isinstance(decision, Batch) else (decision,)
    assert not any(isinstance(a, Batch) for a in flat)
    dispatched = [a for a in flat if isinstance(a, Dispatch)]
    assert len({a.job_id for a in dispatched}) == len(dispatched)
    assert len({a.worker_id for a in dispatched}) == len(dispatched)
    for action in dispatched:
        assert action.job_id in CTX.jobs_by_id
        assert CTX.workers_by_id[action.worker_id][1].status == "ready"


# ---------------------------------------------------------------- a real sandbox worker
@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """A real sandbox worker process running the platform scheduler."""
    socket = tmp_path_factory.mktemp("fuzz") / "w.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-B",
            "-m",
            "sandbox_worker",
            "--socket",
            str(socket),
            "--limits",
            SandboxLimits().to_json(),
        ],
        env={},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        close_fds=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    channel = grpc.insecure_channel(f"unix:{socket}", options=list(GRPC_MESSAGE_OPTIONS))
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
    source = platform_source()
    loaded = stub.Load(
        sandbox_pb2.LoadRequest(
            name="platform.lua",
            source=source,
            platform_source=source,
            limits=SandboxLimits().to_proto(),
        )
    )
    assert loaded.ok
    yield channel
    channel.close()
    process.kill()
    process.wait()
    assert process.returncode == -9  # it was still alive at the end: killed, not crashed


def raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(f"/orchestrator.v1.SandboxService/{method}")
    try:
        call(payload, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def healthy(channel: grpc.Channel) -> bool:
    reply = sandbox_pb2_grpc.SandboxServiceStub(channel).Health(sandbox_pb2.HealthRequest())
    return reply.loaded


@fuzz(200)
@given(st.binary(max_size=2048), st.sampled_from(["Schedule", "Load", "Health", "Echo"]))
def test_worker_survives_malformed_protobuf(
    worker: grpc.Channel, payload: bytes, method: str
) -> None:
    """Random bytes to any method: an error status or a reply, never a dead worker."""
    code = raw(worker, method, payload)
    assert code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert healthy(worker)


jobs = st.builds(
    context_pb2.JobColumns,
    id=st.lists(st.text(max_size=30), max_size=20),
    model_ref=st.lists(st.text(max_size=30), max_size=20),
    priority=st.lists(st.sampled_from(["interactive", "batch", "", "\x00evil"]), max_size=20),
    max_tokens=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
    queued_at=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20),
)


@fuzz(120)
@given(jobs, st.integers(0, 2**64 - 1), st.booleans())
def test_worker_survives_ill_typed_contexts(
    worker: grpc.Channel, columns: context_pb2.JobColumns, epoch: int, sync_only: bool
) -> None:
    """Ragged columns, bad strings and absurd numbers in a snapshot, then a real one:
    the worker answers every time and still schedules."""
    stub = sandbox_pb2_grpc.SandboxServiceStub(worker)
    bad = snapshot.to_proto(CTX)
    bad.queue.CopyFrom(columns)
    reply = stub.Schedule(
        sandbox_pb2.ScheduleRequest(epoch=epoch, seq=1, snapshot=bad, sync_only=sync_only),
        timeout=10,
    )
    assert reply.seq >= 0
    good = stub.Schedule(
        sandbox_pb2.ScheduleRequest(epoch=1, seq=1, snapshot=snapshot.to_proto(CTX)), timeout=10
    )
    assert good.HasField("decision") and not good.HasField("error")


@pytest.mark.slow
def test_worker_survives_oversized_messages(worker: grpc.Channel) -> None:
    """A 513 MB message is refused by gRPC; a 64 MB job id is refused by the Lua heap
    cap or the string limit; the worker keeps serving."""
    code = raw(worker, "Schedule", b"\x0a" + b"\xff" * 5 + b"\x0f" + b"\x00" * (513 * 2**20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub = sandbox_pb2_grpc.SandboxServiceStub(worker)
    huge = snapshot.to_proto(CTX)
    huge.queue.id[0] = "j" * (64 * 2**20)
    started = time.monotonic()
    reply = stub.Schedule(sandbox_pb2.ScheduleRequest(epoch=9, seq=1, snapshot=huge), timeout=60)
    assert reply.HasField("error") or reply.HasField("decision")
    assert time.monotonic() - started < 30
    assert healthy(worker)
