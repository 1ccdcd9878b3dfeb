"""Entry point: `python -I -m sandbox_worker --socket PATH --limits JSON [--parent PID]`.

The core spawns this with an empty environment and no inherited descriptors; the
worker hardens itself before any thread exists, then serves SandboxService on its
unix socket until it is killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from concurrent import futures

from orchestrator.limits import GRPC_MESSAGE_OPTIONS, SandboxLimits
from sandbox_worker.hardening import harden


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox_worker")
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument("--limits", default="{}", help="SandboxLimits as JSON")
    parser.add_argument("--no-seccomp", action="store_true", help="skip the seccomp filter")
    parser.add_argument("--parent", type=int, default=0, help="the spawning core's pid")
    args = parser.parse_args(argv)
    limits = SandboxLimits.from_json(args.limits)
    applied = harden(limits, seccomp=not args.no_seccomp)
    if args.parent and os.getppid() != args.parent:
        # The core died before the parent-death signal was armed: nobody will kill us.
        print("sandbox worker: the core is gone; exiting", file=sys.stderr)
        return 1

    # Imported after hardening: gRPC starts threads, and they must inherit the filter.
    import grpc  # noqa: PLC0415

    from orchestrator._proto import sandbox_pb2_grpc  # noqa: PLC0415
    from sandbox_worker.server import SandboxServicer  # noqa: PLC0415

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1), options=list(GRPC_MESSAGE_OPTIONS)
    )
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(SandboxServicer(applied), server)
    if server.add_insecure_port(f"unix:{args.socket}") == 0:
        print(f"sandbox worker: cannot bind unix:{args.socket}", file=sys.stderr)
        return 1
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
