"""`orchestratord scheduler debug`: step through one scheduling cycle from an editor.

    orchestratord scheduler debug --file F --dap 127.0.0.1:PORT
        [--context FILE | --from-log SEQ --log PATH] [--deadline-ms MS] [--language L]

The contract: F is loaded into a diagnostics sandbox worker with the normal limits
(a load error is a usage error, before anything listens); then one Debug Adapter
Protocol client is served on --dap (orchestrator/debugging/dap.py) and the command
exits 0 when its session ends. The cycle runs on --context, on the context the
decision log recorded for cycle SEQ, or on the sample context.

A YAML policy is debugged as the Lua it compiles to: that Lua is written to a private
temporary directory for the session, the editor is shown that file, and breakpoints
go in it (docs/debugging.md).

The DAP port has neither TLS nor authentication, so --dap must be a loopback address
(127.0.0.1, ::1, localhost); anything else is refused (SECURITY.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.context_file import load_context
from orchestrator.config.settings import SchedulerConfig
from orchestrator.debugging.dap import DebugSession, serve_one_session
from orchestrator.debugging.outcome import FallbackDecision
from orchestrator.debugging.worker import DiagnosticWorker
from orchestrator.domain.context import Context
from orchestrator.domain.errors import UsageError
from orchestrator.domain.samples import sample_context
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import read_policy, to_lua
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.sim.replay import find_cycle


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    debug = sub.add_parser(
        "debug",
        help="step through one scheduling cycle in an editor (Debug Adapter Protocol)",
        description="Run FILE's schedule(ctx) once in a diagnostics sandbox worker and serve "
        'one DAP client (VS Code: a launch configuration with "debugServer": PORT) that '
        "sets breakpoints, steps, and inspects locals, upvalues and ctx. The deadline counts "
        "running time only; past it the worker is killed and the cycle ends with the "
        "platform scheduler's decision, as in production. See docs/debugging.md.",
    )
    debug.add_argument("--file", "-f", required=True, type=Path, help="the Lua or YAML policy")
    debug.add_argument(
        "--dap",
        required=True,
        metavar="HOST:PORT",
        help="where to listen for the DAP client: a loopback address only; PORT 0 picks one",
    )
    context = debug.add_mutually_exclusive_group()
    context.add_argument("--context", type=Path, help="context file (JSON or YAML)")
    context.add_argument(
        "--from-log", type=int, metavar="SEQ", help="the context of cycle SEQ of the --log"
    )
    debug.add_argument(
        "--log", type=Path, help="a decision log file, or a directory of them (state_dir/decisions)"
    )
    debug.add_argument("--language", choices=["luajit", "lua54"], default="luajit")
    debug.add_argument(
        "--deadline-ms",
        type=int,
        default=SandboxLimits.deadline_ms,
        help="running-time budget (stops excluded; default %(default)s)",
    )


def loopback_address(text: str) -> tuple[str, int]:
    """(host, port) of a --dap HOST:PORT, refusing any host that is not loopback."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--dap {text}: expected HOST:PORT, e.g. 127.0.0.1:4711")
    host = host.removeprefix("[").removesuffix("]")
    # Bound by address, not by name: what "localhost" resolves to is not ours to trust.
    host = "127.0.0.1" if host == "localhost" else host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(
            f"--dap {text}: the DAP port has no TLS or authentication, so it listens on a "
            "loopback address only (127.0.0.1, ::1 or localhost); see SECURITY.md"
        )
    return host, int(port_text)


def cycle_context(args: argparse.Namespace) -> Context:
    if (args.from_log is None) != (args.log is None):
        raise UsageError("--from-log SEQ and --log PATH go together")
    if args.context is not None:
        return load_context(args.context)
    if args.from_log is not None:
        return find_cycle(args.log, args.from_log).context
    return sample_context()


@dataclass(frozen=True)
class DebuggedPolicy:
    lua: str
    path: Path  # the file the editor shows and breakpoints name
    notice: str  # for the client: what is debugged, when it is not the file given


@contextlib.contextmanager
def debugged_policy(path: Path) -> Iterator[DebuggedPolicy]:
    """The Lua of the policy at `path`; a YAML policy's compiled Lua lives in a private
    temporary directory (mkdtemp: mode 0700) for the session."""
    source, language = read_policy(path)
    try:
        lua = to_lua(source, language, path.name)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    if language != "yaml":
        yield DebuggedPolicy(lua, path.resolve(), "")
        return
    directory = Path(tempfile.mkdtemp(prefix="orchestratord-debug-"))
    try:
        compiled = directory / f"{path.stem}.lua"
        compiled.write_text(lua)
        notice = (
            f"{path} is a YAML policy: this session debugs the Lua it compiles to, "
            f"{compiled}; set breakpoints in that file"
        )
        yield DebuggedPolicy(lua, compiled, notice)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class PlatformFallback:
    """The decision production makes when the user's scheduler fails: the platform
    scheduler's, through the scheduling engine (its sandbox, validation, and `wait`
    when even it fails)."""

    def __init__(self, language: str, deadline_ms: int) -> None:
        self._language = language
        self._deadline_ms = deadline_ms

    async def decide(self, ctx: Context) -> FallbackDecision:
        options = EngineOptions.from_config(
            SchedulerConfig(deadline_ms=self._deadline_ms), spares=0
        )
        async with SchedulingEngine(language=self._language, options=options) as engine:
            result = await engine.schedule(ctx)
        source = "platform-fallback" if result.source == "platform" else "wait-fallback"
        return FallbackDecision(result.decision, source)


def announce(host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"listening for a DAP client on {shown}:{port}", flush=True)


async def run_debug(args: argparse.Namespace) -> int:
    host, port = loopback_address(args.dap)
    if args.deadline_ms <= 0:
        raise UsageError("--deadline-ms must be positive")
    ctx = cycle_context(args)
    limits = SandboxLimits(deadline_ms=args.deadline_ms)
    with debugged_policy(args.file) as policy:
        async with DiagnosticWorker(
            policy.lua, policy.path.name, language=args.language, limits=limits
        ) as worker:
            session = DebugSession(
                worker,
                PlatformFallback(args.language, args.deadline_ms),
                ctx,
                policy.path,
                deadline_ms=args.deadline_ms,
                max_batch_actions=limits.max_batch_actions,
                notice=policy.notice,
            )
            await serve_one_session(host, port, session, announce)
    return 0


COMMANDS = {"debug": run_debug}
