"""The fork server: a pre-imported Python that forks sandbox workers on request.

Runs in its own process, spawned by the core (orchestrator/sandbox/fork_server.py)
like a worker: empty environment, isolated mode, no inherited descriptors but its
end of a socketpair. Starting a worker by exec costs a Python start-up and ~250 ms
of imports (gRPC, protobuf, lupa); a fork of this process costs a few milliseconds.
Each child hardens itself exactly as an exec'd worker does (sandbox_worker.__main__
.serve), before gRPC starts its first thread.

The server stays single-threaded (fork with threads is unsafe) and never loads a
script itself: children inherit imported code only, no Lua state and no data.

Protocol, one JSON message per SOCK_SEQPACKET datagram:
    fork server -> core, once:  {"ready": true, "pid": P}
    core -> fork server:        {"id": N, "socket": S, "limits": JSON, "seccomp": BOOL}
                                with the worker's log file attached (its stderr), opened
                                by the core: the fork server opens no path to write
    fork server -> core:        {"id": N, "pid": P} with a pidfd of the child attached,
                                or {"id": N, "error": TEXT}
It exits when the core closes its end, and dies with the core (parent-death signal).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any, NoReturn

from orchestrator.sandbox.limits import FORK_SERVER_MESSAGE_BYTES, SandboxLimits
from sandbox_worker.__main__ import serve
from sandbox_worker.hardening import PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, prctl

# What a worker imports before it serves: loaded once here, shared copy-on-write.
PRELOAD = (
    "grpc",
    "google.protobuf",
    "orchestrator._proto.sandbox_pb2_grpc",
    "sandbox_worker.server",
    "lupa.luajit21",
    "lupa.lua54",
)


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    with contextlib.suppress(ImportError, OSError):  # optional, as in install_seccomp
        importlib.import_module("pyseccomp")


def _reopen_stdio(log: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def _child(request: dict[str, Any], log: int, control: socket.socket, server_pid: int) -> NoReturn:
    code = 1
    try:
        # Closed through the object: hardening closes descriptors by number, and the
        # object would later close whatever reused its number.
        control.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _reopen_stdio(log)
        limits = SandboxLimits.from_json(request["limits"])
        code = serve(
            request["socket"],
            limits,
            seccomp=request["seccomp"],
            parent=server_pid,
            diagnostics=bool(request.get("diagnostics")),
        )
    except BaseException:  # a child must never return into the server loop
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _fork(request: dict[str, Any], log: int, control: socket.socket) -> None:
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(request, log, control, server_pid)
    try:
        # SIGCHLD is ignored, so the kernel reaps children: the pidfd is how the core
        # tells exit from pid reuse.
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        control.send(json.dumps({"id": request["id"], "error": f"worker {pid}: {exc}"}).encode())
        return
    try:
        socket.send_fds(control, [json.dumps({"id": request["id"], "pid": pid}).encode()], [pidfd])
    finally:
        os.close(pidfd)


def run(control: socket.socket) -> int:
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    control.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        data, fds, _flags, _addr = socket.recv_fds(control, FORK_SERVER_MESSAGE_BYTES, 1)
        try:
            if not data:
                return 0  # the core closed its end
            try:
                request = json.loads(data)
                request_id = request["id"]
            except (ValueError, KeyError, TypeError) as exc:
                print(f"fork server: bad request: {exc}", file=sys.stderr)
                continue
            if len(fds) != 1:
                error = "no log file attached"
                control.send(json.dumps({"id": request_id, "error": error}).encode())
                continue
            try:
                _fork(request, fds[0], control)
            except OSError as exc:  # fork failed (EAGAIN, ENOMEM): the core execs instead
                control.send(json.dumps({"id": request_id, "error": f"fork: {exc}"}).encode())
        finally:
            for fd in fds:  # the child has its copy; the next children must not
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox_worker.fork_server")
    parser.add_argument("--control-fd", type=int, required=True, help="socketpair end")
    parser.add_argument("--parent", type=int, required=True, help="the core's pid")
    args = parser.parse_args(argv)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args.parent:
        print("fork server: the core is gone; exiting", file=sys.stderr)
        return 1
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    control = socket.socket(fileno=args.control_fd)
    try:
        return run(control)
    except (BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
