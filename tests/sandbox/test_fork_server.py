"""The fork server: workers forked from one pre-imported process, and what happens
when it dies, cannot start, or answers a request whose caller has gone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from orchestrator.domain.samples import sample_context
from orchestrator.sandbox import fork_server
from orchestrator.sandbox.fork_server import ForkServer, pidfd_exited, shared_fork_server
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.support.files import open_log
from tests.conftest import EngineFactory

WAIT = "function schedule(ctx) return { action = 'wait' } end"


async def _exited(pidfd: int, within_s: float = 5.0) -> bool:
    for _ in range(int(within_s / 0.02)):
        if pidfd_exited(pidfd):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_every_worker_is_forked_by_one_fork_server(make_engine: EngineFactory) -> None:
    """The workers of two engines are children of the same fork server, not of the core,
    and serve decisions."""
    first = await make_engine(WAIT)
    second = await make_engine(None)
    server = shared_fork_server()
    workers = [w for e in (first, second) for g in (e.platform, e.user) if g for w in g.workers()]
    assert len(workers) == 6
    assert {psutil.Process(w.pid).ppid() for w in workers} == {server.pid}
    assert server.pid != os.getpid() and psutil.Process(server.pid).ppid() == os.getpid()
    assert (await first.schedule(sample_context())).source == "user"
    assert (await second.schedule(sample_context())).source == "platform"


async def test_a_killed_fork_server_takes_its_workers_and_is_replaced(
    make_engine: EngineFactory,
) -> None:
    """SIGKILL on the fork server: its workers die with it (nothing is orphaned), the
    engine keeps answering, and the next spawns come from a new fork server."""
    engine = await make_engine(WAIT)
    old = shared_fork_server().pid
    pidfds = [w.pidfd for g in (engine.platform, engine.user) if g for w in g.workers()]
    os.kill(old, signal.SIGKILL)
    assert all([await _exited(fd) for fd in pidfds if fd is not None])
    with capture_logs() as logs:
        sources = []
        for _ in range(100):
            result = await engine.schedule(sample_context())
            sources.append(result.source)
            if result.source == "user":
                break
            await asyncio.sleep(0.1)
    assert sources[-1] == "user", sources
    assert sources[0] != "user"  # the dead worker's cycle fell back
    assert shared_fork_server().pid not in (0, old)
    assert any(e["event"] == "sandbox.fork_server_started" for e in logs)


async def test_without_a_fork_server_workers_are_execd(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork server that cannot start (here: its module is missing) costs nothing but
    speed: the worker is exec'd by the core, the cause is logged, and it serves."""
    broken = ForkServer()
    monkeypatch.setattr(fork_server, "_SHARED", [broken])
    monkeypatch.setattr(fork_server, "FORK_SERVER_MODULE", "sandbox_worker.no_such_module")
    with capture_logs() as logs:
        engine = await make_engine(WAIT, user_spares=0, platform_spares=0)
    assert engine.user is not None and engine.user.active is not None
    assert psutil.Process(engine.user.active.pid).ppid() == os.getpid()
    assert (await engine.schedule(sample_context())).source == "user"
    failures = [e for e in logs if e["event"] == "sandbox.fork_failed"]
    assert failures and failures[0]["fallback"] == "exec"
    assert "fork server" in failures[0]["reason"]
    broken.stop()


async def test_a_worker_whose_caller_was_cancelled_is_killed(tmp_path: Path) -> None:
    """A spawn cancelled after its request was sent leaves a worker nobody owns; the next
    request's exchange kills it instead of leaking it."""
    server = shared_fork_server()
    limits = SandboxLimits()
    log = open_log(tmp_path / "workers.log")  # the workers' stderr, passed as a descriptor
    warm = await server.spawn(tmp_path / "warm.sock", log, limits, seccomp=True)
    before = {p.pid for p in psutil.Process(server.pid).children()}
    os.kill(server.pid, signal.SIGSTOP)  # so that the reply cannot beat the cancellation
    cancelled = asyncio.create_task(server.spawn(tmp_path / "a.sock", log, limits, seccomp=True))
    await asyncio.sleep(0.05)  # the request is sent and waits for its reply
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    os.kill(server.pid, signal.SIGCONT)
    orphan = None
    for _ in range(100):
        fresh = [p for p in psutil.Process(server.pid).children() if p.pid not in before]
        if fresh:
            orphan = fresh[0]
            break
        await asyncio.sleep(0.02)
    assert orphan is not None
    fresh_worker = await server.spawn(tmp_path / "b.sock", log, limits, seccomp=True)
    try:
        assert fresh_worker[0] != orphan.pid and not pidfd_exited(fresh_worker[1])
        with contextlib.suppress(psutil.NoSuchProcess):
            orphan.wait(timeout=2)  # killed by the exchange, reaped by the fork server
        assert not orphan.is_running()
    finally:
        for _, pidfd in (warm, fresh_worker):
            fork_server.kill_pidfd(pidfd)
            os.close(pidfd)
        os.close(log)
