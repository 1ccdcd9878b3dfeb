"""The worker's servicer in-process: context updates as the core sends them, then a call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from orchestrator._proto import sandbox_pb2
from orchestrator.domain.samples import sample_context
from orchestrator.sandbox.limits import MiB, SandboxLimits
from orchestrator.scheduling.engine import platform_source
from orchestrator.state.journal import SnapshotJournal
from sandbox_worker.server import SandboxServicer
from tests.conftest import LANGUAGE_ENUM

HEAP = 16 * MiB
# Allocates 40 MiB in one call, far past a 16 MiB heap; a 4 KiB piece repeated, which
# Lua 5.4 copies with one memcpy per piece (a byte-wise string.rep of 40 MiB takes ~0.3 s).
GREEDY = """
function schedule(ctx)
  hoard = string.rep(string.rep("x", 4096), 10240)
  return { action = "wait", reason = "allocated " .. #hoard }
end
"""


class RpcContext:
    """What the servicer uses of grpc.ServicerContext."""

    def __init__(self) -> None:
        self.code: object = None

    def set_code(self, code: object) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass


class Core:
    """The core's side, as the engine drives a worker (scheduling/attempt.py)."""

    def __init__(self, language: str, source: str) -> None:
        self.worker = SandboxServicer([])
        self.journal = SnapshotJournal()
        self.now = sample_context().now_ms
        limits = SandboxLimits(lua_heap_bytes=HEAP)
        reply = self.worker.Load(
            sandbox_pb2.LoadRequest(
                name="test.lua",
                source=source,
                language=LANGUAGE_ENUM[language],
                limits=limits.to_proto(),
                platform_source=platform_source(),
            ),
            RpcContext(),  # type: ignore[arg-type]
        )
        assert reply.ok, reply.error.message

    def advance(self) -> None:
        self.now += 1000
        self.journal.advance(dataclasses.replace(sample_context(), now_ms=self.now))

    def call(self, *, full: bool = False, sync_only: bool = False) -> sandbox_pb2.ScheduleReply:
        w = self.worker
        request = (
            self.journal.request_for(0, 0) if full else self.journal.request_for(w.epoch, w.seq)
        )
        request.sync_only = sync_only
        rpc = RpcContext()
        reply = w.Schedule(request, rpc)  # type: ignore[arg-type]
        assert rpc.code is None, "the worker refused the update"
        return reply


def resync_then_call(core: Core) -> sandbox_pb2.ScheduleReply:
    """A worker that needs a full snapshot gets it alone, before the timed call, which
    then carries no update; a promoted spare, synced in the background, is the same."""
    core.advance()
    core.call(full=True, sync_only=True)
    return core.call()


def snapshot_in_the_call(core: Core) -> sandbox_pb2.ScheduleReply:
    core.advance()
    return core.call(full=True)


def delta(core: Core) -> sandbox_pb2.ScheduleReply:
    core.advance()
    core.call(full=True, sync_only=True)
    core.advance()
    return core.call()


@pytest.mark.parametrize("language", ["luajit", "lua54"])
@pytest.mark.parametrize("update", [resync_then_call, snapshot_in_the_call, delta])
def test_the_heap_cap_holds_on_every_call(
    language: str, update: Callable[[Core], sandbox_pb2.ScheduleReply]
) -> None:
    """However the worker was brought up to date, a script past its heap cap gets a
    memory error and the worker retires. The first call after a resync once ran with no
    cap at all: a script allocated 208 MiB against 64."""
    core = Core(language, GREEDY)
    reply = update(core)
    assert not reply.HasField("decision"), reply.decision.reason
    assert reply.error.kind == sandbox_pb2.ERROR_KIND_MEMORY_LIMIT
    assert "not enough memory" in reply.error.message
    assert reply.retire
    assert reply.lua_memory_bytes < HEAP + 8 * MiB


@pytest.mark.parametrize("language", ["luajit", "lua54"])
def test_a_script_within_its_heap_runs_on_every_call(language: str) -> None:
    """The cap is the script's heap on top of the context: 4 MiB kept across calls (and
    the next 4 MiB, with Lua 5.4's buffer for it, built while the last is kept) fits."""
    core = Core(language, GREEDY.replace("10240", "1024"))
    for update in (resync_then_call, snapshot_in_the_call, delta, delta):
        reply = update(core)
        assert reply.decision.reason == f"allocated {4 * MiB}", reply.error.message
        assert not reply.retire
