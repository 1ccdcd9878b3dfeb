"""Entry point: `python -I -m sandbox_worker --socket PATH --limits JSON [--parent PID]`.

The core spawns this with an empty environment and no inherited descriptors (or the
fork server forks it, sandbox_worker/fork_server.py); the worker hardens itself
before any thread exists, then serves SandboxService on its unix socket until it is
killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from concurrent import futures

from orchestrator.sandbox.limits import GRPC_MESSAGE_OPTIONS, SandboxLimits
from sandbox_worker.hardening import harden


def serve(
    socket_path: str,
    limits: SandboxLimits,
    *,
    seccomp: bool,
    parent: int,
    diagnostics: bool = False,
) -> int:
    """Harden this process, then serve SandboxService on `socket_path` until killed.

    `diagnostics`: a worker for trace, profile or the step debugger (issue 18), never
    started by the production scheduling path. Only such a worker honours a request's
    `instrument` and serves Debug, which runs beside the Schedule call it steps
    through: hence a second thread.
    """
    applied = harden(limits, seccomp=seccomp)
    if parent and os.getppid() != parent:
        # The parent died before the parent-death signal was armed: nobody will kill us.
        print("sandbox worker: the core is gone; exiting", file=sys.stderr)
        return 1

    # Imported after hardening: gRPC starts threads, and they must inherit the filter.
    # (The fork server imports the modules beforehand, which starts no thread.)
    import grpc  # noqa: PLC0415

    from orchestrator._proto import sandbox_pb2_grpc  # noqa: PLC0415
    from sandbox_worker.server import SandboxServicer  # noqa: PLC0415

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 if diagnostics else 1),
        options=list(GRPC_MESSAGE_OPTIONS),
    )
    servicer = SandboxServicer(applied, diagnostics=diagnostics)
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        print(f"sandbox worker: cannot bind unix:{socket_path}", file=sys.stderr)
        return 1
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox_worker")
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument("--limits", default="{}", help="SandboxLimits as JSON")
    parser.add_argument("--no-seccomp", action="store_true", help="skip the seccomp filter")
    parser.add_argument("--parent", type=int, default=0, help="the spawning core's pid")
    parser.add_argument(
        "--diagnostics", action="store_true", help="honour trace, profile and Debug (issue 18)"
    )
    args = parser.parse_args(argv)
    limits = SandboxLimits.from_json(args.limits)
    return serve(
        args.socket,
        limits,
        seccomp=not args.no_seccomp,
        parent=args.parent,
        diagnostics=args.diagnostics,
    )


if __name__ == "__main__":
    sys.exit(main())
