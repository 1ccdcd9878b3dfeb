"""The core's side of the fork server (sandbox_worker/fork_server.py): start it,
ask it for workers, restart it when it dies.

One fork server serves every worker group of the core. A worker it forks is not
the core's child: it is handed back as a pid and a pidfd, which the core uses to
kill it and to see it exit without being fooled by pid reuse. When the fork server
cannot be brought up, `spawn` raises SandboxUnavailableError and the caller execs
the worker instead.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from orchestrator.domain.errors import SandboxUnavailableError
from orchestrator.sandbox.limits import FORK_SERVER_MESSAGE_BYTES, SandboxLimits
from orchestrator.support.log import get_logger

log = get_logger("sandbox")

FORK_SERVER_MODULE = "sandbox_worker.fork_server"
READY_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 5.0


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def kill_pidfd(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout_s: float) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the caller's
        # cancellation when the socket turns readable at the same moment.
        async with asyncio.timeout(max(0.0, timeout_s)):
            await ready
    finally:
        loop.remove_reader(sock.fileno())


class ForkServer:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._ids = itertools.count(1)
        # Callers on one event loop take turns; a test suite runs many loops in turn.
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    async def spawn(
        self,
        socket_path: Path,
        log_fd: int,
        limits: SandboxLimits,
        *,
        seccomp: bool,
        diagnostics: bool = False,
    ) -> tuple[int, int]:
        """Fork a worker that will serve on `socket_path` with `log_fd` (the caller's,
        opened by orchestrator/support/files.py) as its stderr; returns its pid and a
        pidfd the caller owns. One retry with a fresh fork server if the old one is gone."""
        lock = self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        request = {
            "socket": str(socket_path),
            "limits": limits.to_json(),
            "seccomp": seccomp,
            "diagnostics": diagnostics,
        }
        async with lock:
            for attempt in (1, 2):
                try:
                    await self._ensure_running()
                    return await self._request(request, log_fd)
                except (OSError, EOFError, TimeoutError, ValueError) as exc:
                    self.stop()
                    if attempt == 2:
                        raise SandboxUnavailableError(f"fork server: {exc}") from None
                    log.warning("sandbox.fork_server_restart", reason=str(exc))
        raise AssertionError("unreachable")

    async def _ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None and self._control:
            return
        self.stop()
        started = time.perf_counter()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable, "-I", "-B", "-m", FORK_SERVER_MODULE,
            "--control-fd", str(theirs.fileno()), "--parent", str(os.getpid()),
        ]  # fmt: skip
        try:
            # Its parent-death signal follows the thread that spawns it: the event
            # loop's, which lives as long as the core.
            self.process = subprocess.Popen(
                argv,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        reply, fds = await self._receive(READY_TIMEOUT_S)
        for fd in fds:
            os.close(fd)
        if not reply.get("ready"):
            raise ValueError(f"unexpected greeting {reply!r}")
        log.info(
            "sandbox.fork_server_started",
            pid=self.pid,
            start_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def _request(self, request: dict[str, Any], log_fd: int) -> tuple[int, int]:
        assert self._control is not None
        request_id = next(self._ids)
        # The log goes as a descriptor: the fork server never opens a path to write.
        message = json.dumps({"id": request_id, **request}).encode()
        socket.send_fds(self._control, [message], [log_fd])
        while True:
            reply, fds = await self._receive(REPLY_TIMEOUT_S)
            if reply.get("id") == request_id:
                break
            # The answer to a request whose caller was cancelled: nobody owns that worker.
            for fd in fds:
                kill_pidfd(fd)
                os.close(fd)
        if "error" in reply or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise SandboxUnavailableError(f"fork server: {reply.get('error', reply)}")
        return int(reply["pid"]), fds[0]

    async def _receive(self, timeout_s: float) -> tuple[dict[str, Any], list[int]]:
        control = self._control
        assert control is not None
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, FORK_SERVER_MESSAGE_BYTES, 1)
            except BlockingIOError:
                await _readable(loop, control, deadline - time.monotonic())
                continue
            if not data:
                for fd in fds:
                    os.close(fd)
                raise EOFError("the fork server exited")
            return json.loads(data), fds

    def stop(self) -> None:
        """Close the channel (the server exits on EOF) and kill it to be sure."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)
            self.process = None


_SHARED: list[ForkServer] = []


def shared_fork_server() -> ForkServer:
    """The core's one fork server, started on first use and stopped at exit."""
    if not _SHARED:
        _SHARED.append(ForkServer())
        atexit.register(_SHARED[0].stop)
    return _SHARED[0]
