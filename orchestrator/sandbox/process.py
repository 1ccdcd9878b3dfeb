"""One sandbox worker process, seen from the parent: spawn, load, call, kill.

Runs in the core. The worker is forked by the fork server (fork_server.py) or
exec'd; either way it starts with an empty environment, no inherited descriptors
beyond /dev/null and its log file, in its own session, under `-I` (isolated mode: no
user site, no PYTHON* variables, no current directory on the path). Killing is
SIGKILL: hooks inside Lua cannot be trusted to stop a script.

The log file is opened here, by the core, with orchestrator/support/files.py (never
through a link) and handed to the worker as a descriptor: no sandbox process opens a
path of the runtime directory for writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc import aio

from orchestrator._proto import sandbox_pb2, sandbox_pb2_grpc
from orchestrator.config.settings import SPAWN_METHODS
from orchestrator.domain.errors import SandboxUnavailableError, SchedulerLoadError
from orchestrator.sandbox.fork_server import (
    kill_pidfd,
    pidfd_exited,
    shared_fork_server,
)
from orchestrator.sandbox.limits import GRPC_MESSAGE_OPTIONS, SandboxLimits
from orchestrator.support.files import open_log
from orchestrator.support.log import get_logger

log = get_logger("sandbox")
Reply = TypeVar("Reply")

LANGUAGES = {"luajit": sandbox_pb2.LANGUAGE_LUAJIT, "lua54": sandbox_pb2.LANGUAGE_LUA54}
# gRPC's own deadline, a backstop behind the event loop's timer (schedule()).
DEADLINE_SLACK_S = 0.02
# The socket file appears at bind(), a moment before listen(): a connection refused
# then must be retried in milliseconds, not after gRPC's default 1 s backoff.
CHANNEL_OPTIONS = (
    *GRPC_MESSAGE_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 200),
)


@dataclass(frozen=True)
class SystemdLaunch:
    """Run workers as instances of a systemd unit template instead of as children:
    `orchestrator-sandbox@TENANT-LABEL.service`, each under its own dynamic user, serving
    on `socket_dir/TENANT-LABEL.sock` (deploy/systemd/orchestrator-sandbox@.service)."""

    prefix: str  # the tenant: part of the instance name
    unit: str = "orchestrator-sandbox@{instance}.service"
    socket_dir: Path = Path("/run/orchestratord/sandbox")
    systemctl: tuple[str, ...] = ("systemctl",)

    def instance(self, label: str) -> str:
        return f"{self.prefix}-{label}"


@dataclass(frozen=True)
class SchedulerSpec:
    """What a worker runs: one scheduler, its language, limits and the platform source."""

    name: str
    source: str
    platform_source: str
    language: str = "luajit"
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    expose_platform_source: bool = True
    seccomp: bool = True
    systemd: SystemdLaunch | None = None
    spawn: str = "fork-server"
    # A worker for trace, profile or the step debugger (orchestrator/debugging/); the
    # production scheduling path never sets it.
    diagnostics: bool = False

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"language must be one of {sorted(LANGUAGES)}, not {self.language!r}")
        if self.spawn not in SPAWN_METHODS:
            raise ValueError(f"spawn must be one of {list(SPAWN_METHODS)}, not {self.spawn!r}")

    def load_request(self) -> sandbox_pb2.LoadRequest:
        return sandbox_pb2.LoadRequest(
            name=self.name,
            source=self.source,
            language=LANGUAGES[self.language],
            limits=self.limits.to_proto(),
            platform_source=self.platform_source,
            expose_platform_source=self.expose_platform_source,
        )


class WorkerProcess:
    """A spawned sandbox worker and the gRPC channel to it."""

    def __init__(self, spec: SchedulerSpec, runtime_dir: Path, label: str) -> None:
        self.spec = spec
        self.label = label
        self.socket_path = runtime_dir / f"{label}.sock"
        self.log_path = runtime_dir / f"{label}.log"
        self.unit = ""
        self.unit_pid = 0  # a systemd-started worker is not our child
        # Nor is a forked one: the fork server's child, known by pid and pidfd.
        self.forked_pid = 0
        self.pidfd: int | None = None
        if spec.systemd is not None:
            instance = spec.systemd.instance(label)
            self.unit = spec.systemd.unit.format(instance=instance)
            self.socket_path = spec.systemd.socket_dir / f"{instance}.sock"
        self.process: asyncio.subprocess.Process | None = None
        self.channel: aio.Channel | None = None
        self.stub: sandbox_pb2_grpc.SandboxServiceStub | None = None
        # What the core knows the worker holds (SnapshotJournal coordinates).
        self.epoch = 0
        self.seq = 0
        # Done when the Schedule call in flight has answered (see `busy`).
        self._answered: asyncio.Future[None] | None = None
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else (self.forked_pid or self.unit_pid)

    @property
    def alive(self) -> bool:
        """Running, as far as the kernel knows: a crash is seen before the next call,
        not when the call fails (the reaper thread may not have told asyncio yet)."""
        if self.pidfd is not None:
            return not self.killed and not pidfd_exited(self.pidfd)
        if self.killed or (self.process is None and not self.unit_pid):
            return False
        if self.process is not None and self.process.returncode is not None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"Z", b"X")

    async def start(self) -> None:
        """Spawn, wait until it serves, and load the scheduler.

        Raises SchedulerLoadError when the script does not load, and
        SandboxUnavailableError when the process cannot be brought up.
        """
        limits = self.spec.limits
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self.spec.systemd is not None:
            await self._start_unit()  # its output goes to the journal
        else:
            try:
                log_fd = open_log(self.log_path)
            except OSError as exc:
                raise SandboxUnavailableError(f"{self.label}: worker log: {exc}") from None
            try:
                await self._spawn(limits, log_fd)
            finally:
                os.close(log_fd)  # the worker has its own copy
        try:
            await self._ready_and_load(limits)
        except BaseException:
            self.kill()  # cancelled or failed half way: never leave the process behind
            raise

    async def _spawn(self, limits: SandboxLimits, log_fd: int) -> None:
        if self.spec.spawn == "fork-server":
            try:
                self.forked_pid, self.pidfd = await shared_fork_server().spawn(
                    self.socket_path,
                    log_fd,
                    limits,
                    seccomp=self.spec.seccomp,
                    diagnostics=self.spec.diagnostics,
                )
                return
            except SandboxUnavailableError as exc:
                log.warning("sandbox.fork_failed", worker=self.label, reason=str(exc),
                            fallback="exec")  # fmt: skip
        await self._exec(limits, log_fd)

    async def _exec(self, limits: SandboxLimits, log_fd: int) -> None:
        argv = [
            sys.executable, "-I", "-B", "-m", "sandbox_worker",
            "--socket", str(self.socket_path), "--limits", limits.to_json(),
            "--parent", str(os.getpid()),
        ]  # fmt: skip
        if not self.spec.seccomp:
            argv.append("--no-seccomp")
        if self.spec.diagnostics:
            argv.append("--diagnostics")
        self.process = await asyncio.create_subprocess_exec(
            *argv,
            env={},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_fd,
            close_fds=True,
            start_new_session=True,
        )

    async def _ready_and_load(self, limits: SandboxLimits) -> None:
        try:
            await self._wait_ready(limits.spawn_timeout_ms / 1000)
            assert self.stub is not None
            reply = await self._rpc(
                self.stub.Load(self.spec.load_request(), timeout=limits.load_timeout_ms / 1000)
            )
        except grpc.RpcError as exc:
            if isinstance(exc, aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise SchedulerLoadError(
                    f"{self.spec.name}: loading took longer than {limits.load_timeout_ms} ms "
                    "(does the top level of the script loop?)",
                    transient=True,
                ) from None
            raise SandboxUnavailableError(f"{self.label}: Load failed: {exc}") from None
        if not reply.ok:
            raise SchedulerLoadError(
                f"{self.spec.name}: {reply.error.message}", reply.error.traceback
            )

    async def _systemctl(self, *args: str) -> tuple[int, str]:
        assert self.spec.systemd is not None
        proc = await asyncio.create_subprocess_exec(
            *self.spec.systemd.systemctl, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace").strip()

    async def _start_unit(self) -> None:
        code, out = await self._systemctl("start", self.unit)
        if code != 0:
            raise SandboxUnavailableError(f"{self.unit}: systemctl start failed: {out}")
        code, out = await self._systemctl("show", "--property=MainPID", "--value", self.unit)
        self.unit_pid = int(out) if code == 0 and out.isdigit() else 0

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.returncode is not None:
                raise SandboxUnavailableError(
                    f"{self.label}: worker exited with status {self.process.returncode} "
                    f"while starting: {self.log_tail()}"
                )
            if self.pidfd is not None and pidfd_exited(self.pidfd):
                raise SandboxUnavailableError(
                    f"{self.label}: worker exited while starting: {self.log_tail()}"
                )
            if self.socket_path.exists():
                break
            if time.monotonic() > deadline:
                raise SandboxUnavailableError(f"{self.label}: worker did not start in {timeout_s}s")
            await asyncio.sleep(0.005)
        self.channel = aio.insecure_channel(
            f"unix:{self.socket_path}", options=list(CHANNEL_OPTIONS)
        )
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self.channel)
        remaining = max(0.1, deadline - time.monotonic())
        try:
            await self._rpc(
                self.stub.Health(
                    sandbox_pb2.HealthRequest(), timeout=remaining, wait_for_ready=True
                )
            )
        except grpc.RpcError as exc:
            raise SandboxUnavailableError(
                f"{self.label}: worker does not answer: {exc}; {self.log_tail()}"
            ) from None

    @property
    def busy(self) -> bool:
        """A Schedule call is in flight: a request built now from (epoch, seq) would
        start from a state the worker is about to leave, and be refused."""
        return self._answered is not None and not self._answered.done()

    async def settle(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, for the call in flight (a spare's background sync,
        the platform's discarded hedge) to answer, so that the next request follows it."""
        answered = self._answered
        if answered is not None and not answered.done():
            await asyncio.wait((answered,), timeout=max(0.0, timeout_s))

    async def schedule(
        self, request: sandbox_pb2.ScheduleRequest, timeout_s: float
    ) -> sandbox_pb2.ScheduleReply:
        """One Schedule call; past `timeout_s` it fails with DEADLINE_EXCEEDED.

        The event loop's timer cancels the call: it fires ~1 ms late, where gRPC's own
        deadline (kept as a backstop) is ~3 ms late, and costs less than wrapping the
        call in asyncio.timeout. Callers build `request` from (epoch, seq) in the same
        step as they call this (no await between), so `busy` covers it from the start.
        """
        assert self.stub is not None
        loop = asyncio.get_running_loop()
        call = self.stub.Schedule(request, timeout=timeout_s + DEADLINE_SLACK_S)
        deadline = loop.time() + timeout_s
        expiry = loop.call_at(deadline, call.cancel)
        answered = self._answered = loop.create_future()
        try:
            reply: sandbox_pb2.ScheduleReply = await self._rpc(call, deadline)
        finally:
            expiry.cancel()
            answered.set_result(None)
        self.epoch, self.seq = request.epoch, reply.seq
        return reply

    async def health(self, timeout_s: float = 1.0) -> sandbox_pb2.HealthReply:
        assert self.stub is not None
        reply: sandbox_pb2.HealthReply = await self._rpc(
            self.stub.Health(sandbox_pb2.HealthRequest(), timeout=timeout_s)
        )
        return reply

    async def _rpc(self, call: Awaitable[Reply], deadline: float | None = None) -> Reply:
        """Await a call on this worker's channel.

        Killing the worker closes its channel, and grpc.aio then cancels the calls in
        flight: whoever awaits one gets a CancelledError that nobody aimed at it. Left
        alone, that ended the service's scheduling loop for good (found by the soak).
        Unless the awaiting task is itself being cancelled, it is reported as the
        worker's failure, UNAVAILABLE, like any other crash; or, past the event loop's
        `deadline` (the timer of schedule() cancelled it), as DEADLINE_EXCEEDED.
        """
        try:
            return await call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            else:
                code, details = grpc.StatusCode.UNAVAILABLE, "the worker was killed"
            raise aio.AioRpcError(
                code,
                aio.Metadata(),
                aio.Metadata(),
                details=f"{self.label}: the call was cancelled ({details})",
            ) from None

    def kill(self) -> None:
        """SIGKILL now; reaping and cleanup happen in the background."""
        if self.killed:
            return
        self.killed = True
        # A call in flight fails on its own: the kernel closes a dead worker's socket.
        if self.pidfd is not None:
            kill_pidfd(self.pidfd)
        elif self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        elif self.unit_pid:
            # PermissionError: another user's process, which systemctl kills in _cleanup.
            with contextlib.suppress(PermissionError, ProcessLookupError):
                os.kill(self.unit_pid, signal.SIGKILL)
        asyncio.get_running_loop().create_task(self._cleanup())

    async def _cleanup(self) -> None:
        if self.process is not None:
            await self.process.wait()
        if self.pidfd is not None:
            for _ in range(1000):  # SIGKILL takes effect in microseconds to milliseconds
                if pidfd_exited(self.pidfd):
                    break
                await asyncio.sleep(0.005)
            os.close(self.pidfd)
            self.pidfd = None
        if self.unit:
            await self._systemctl("kill", "--signal=SIGKILL", self.unit)
            await self._systemctl("stop", "--no-block", self.unit)
        if self.channel is not None:
            await self.channel.close(grace=None)
        for path in (self.socket_path, self.log_path):
            with contextlib.suppress(OSError):  # gone already, or the unit's to remove
                path.unlink()

    def log_tail(self, limit: int = 2000) -> str:
        """The end of the worker's stderr: a crash's last words."""
        # Not through a link, nor blocked by a FIFO: the tail goes into errors callers see.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            with open(os.open(self.log_path, flags), "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - limit))
                tail = log.read() or b""  # None: a FIFO with nothing to read
                return tail.decode("utf-8", "replace").strip() or "(no output)"
        except OSError:
            return "(no log)"
