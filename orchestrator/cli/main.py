"""The `orchestratord` command line.

    orchestratord scheduler test --file F [--dry-run] [--context FILE | --bank NAME]
                                 [--trace | --profile] [--json]
    orchestratord scheduler validate FILE [--profile] [--json]
    orchestratord scheduler platform-source
    orchestratord scheduler sample-context [--json]
    orchestratord scheduler simulate --file F [--queue-depth N --pools N ...]
    orchestratord scheduler compare A B [workload options]
    orchestratord scheduler replay --log FILE --file CANDIDATE
    orchestratord scheduler replay --log FILE --file CANDIDATE --seq N [--trace | --profile]
    orchestratord scheduler debug --file F (--context C | --from-log SEQ --log L)
                                  --dap 127.0.0.1:PORT
    orchestratord auth new-key --name N --role tenant|operator|pool [--tenant T] [--pool P]

Commands that talk to a running orchestrator take --token-file (or $ORCHESTRATOR_TOKEN),
--tls-ca, and --tls-cert/--tls-key for mutual TLS (SECURITY.md).

Exit status of `scheduler test`: 0 when the user's scheduler decided, 3 when the
cycle fell back, 2 on bad usage (unreadable file, bad context, bad flags). Under
--trace or --profile, 0 when the script returned a valid decision, 3 when it did not.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from grpc import aio

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc
from orchestrator.cli.auth import add_commands as add_auth_commands
from orchestrator.cli.auth import auth_command
from orchestrator.cli.debug import COMMANDS as DEBUG_COMMANDS
from orchestrator.cli.debug import add_commands as add_debug_commands
from orchestrator.cli.jobs import job_command
from orchestrator.cli.sim import COMMANDS as SIM_COMMANDS
from orchestrator.cli.sim import add_commands as add_sim_commands
from orchestrator.config.context_file import context_to_dict, load_context
from orchestrator.config.settings import SchedulerConfig, load_config
from orchestrator.debugging.diagnose import TIMES, diagnose
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context
from orchestrator.domain.errors import OrchestratorError, UsageError
from orchestrator.domain.jobs import JobState
from orchestrator.domain.samples import sample_context
from orchestrator.policy.compile import compile_yaml
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import (
    BANK,
    LARGEST_BANK_CONTEXT,
    bank_context,
    policy_version,
    read_policy,
    to_lua,
    validate_policy,
)
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine, platform_source
from orchestrator.support.log import configure_logging
from orchestrator.wire.channel import add_client_arguments, auth_from_arguments, open_channel

EXIT_USER = 0
EXIT_USAGE = 2
EXIT_FALLBACK = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestratord",
        description="Programmable scheduler for LLM-inference orchestration.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the orchestrator (gRPC job, pool and admin services, /metrics)",
        description="Run the orchestrator. Without --config it uses the embedded default "
        "(lab mode, platform scheduler, development workers, state in ./.orchestratord).",
    )
    serve.add_argument("--config", type=Path, help="YAML config (deploy/config/ has examples)")
    serve.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="auto: readable on a terminal, JSON otherwise (journald)",
    )

    bench = commands.add_parser("bench", help="measure, and write BENCHMARKS.md")
    bench.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    bench.add_argument("--quick", action="store_true", help="small runs, for a smoke check")

    job = commands.add_parser(
        "job", help="submit, follow and manage jobs on a running orchestrator"
    )
    job.add_argument(
        "--address", default="127.0.0.1:50051", help="the orchestrator's gRPC HOST:PORT"
    )
    add_client_arguments(job)
    job_commands = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    submit = job_commands.add_parser(
        "submit", help="submit a job and print it (--wait: print its tokens as they come)"
    )
    submit.add_argument("--model", required=True, help="a catalog model_ref or alias")
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--max-tokens", type=int, default=64)
    submit.add_argument("--priority", choices=["interactive", "batch"], default="batch")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--top-p", type=float, help="nucleus sampling, within (0, 1]; default 1")
    submit.add_argument(
        "--stop", action="append", default=[], help="a sequence that ends the output (repeatable)"
    )
    submit.add_argument("--tenant", default="")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="print the output to stdout as it is generated, then how the job ended to stderr",
    )
    for name, text in (
        ("get", "print a job"),
        ("cancel", "cancel a job"),
        ("watch", "follow a job until it ends"),
    ):
        sub_job = job_commands.add_parser(name, help=text)
        sub_job.add_argument("job_id")
    listing = job_commands.add_parser("list", help="list jobs")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        choices=[state.value for state in JobState],
    )
    listing.add_argument("--limit", type=int, default=50)

    pool = commands.add_parser(
        "pool-manager",
        help="run a pool on this host for an orchestrator on another",
        description="Register this host's GPUs with an orchestrator, heartbeat, and start or "
        "evict inference workers when it says so. Uses the local_pool section of --config.",
    )
    pool.add_argument("--orchestrator", required=True, help="the core's gRPC HOST:PORT")
    add_client_arguments(pool)
    pool.add_argument("--config", type=Path, help="YAML config (local_pool, pools, state_dir)")
    pool.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")

    scheduler = commands.add_parser("scheduler", help="work with scheduler policies")
    sub = scheduler.add_subparsers(dest="scheduler_command", required=True, metavar="SUBCOMMAND")

    test = sub.add_parser(
        "test",
        help="run a scheduler once in a real sandbox on a sample or given context",
        description=(
            "Run FILE's schedule(ctx) once in a sandbox worker, exactly as the orchestrator "
            "would (same sandbox, validator and fallback), and print the decision. Nothing "
            "is executed: the test is always a dry run."
        ),
    )
    test.add_argument("--file", "-f", required=True, type=Path, help="the Lua scheduler")
    test.add_argument(
        "--dry-run", action="store_true", help="accepted for the spec's spelling; always on"
    )
    where = test.add_mutually_exclusive_group()
    where.add_argument(
        "--context", type=Path, help="context file (JSON or YAML); default: the sample context"
    )
    where.add_argument(
        "--bank",
        choices=list(BANK),
        metavar="NAME",
        help="a context of the validation bank: " + ", ".join(BANK),
    )
    mode = test.add_mutually_exclusive_group()
    mode.add_argument(
        "--trace",
        action="store_true",
        help="show the lines that ran, how often, and each built-in call with its result",
    )
    mode.add_argument(
        "--profile",
        action="store_true",
        help="time per line and per function (medians of several runs), and the "
        "profiler's own overhead",
    )
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.add_argument(
        "--language", choices=["luajit", "lua54"], default="luajit", help="Lua runtime"
    )
    test.add_argument(
        "--deadline-ms", type=int, default=SandboxLimits.deadline_ms, help="decision deadline"
    )

    validate = sub.add_parser(
        "validate",
        help="validate a policy: syntax, semantics on the validation bank, speed",
        description="Syntax (compile or load), semantics (every context of the validation "
        "bank decided by the policy itself, each decision valid), speed (p99 within the "
        "budget). Runs locally in real sandbox workers. Exit 0 valid, 1 invalid, 2 usage.",
    )
    validate.add_argument("file", type=Path)
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.add_argument("--deadline-ms", type=int, default=SandboxLimits.deadline_ms)
    validate.add_argument(
        "--profile",
        action="store_true",
        help=f"then profile the policy on the bank's largest context ({LARGEST_BANK_CONTEXT})",
    )
    compile_ = sub.add_parser("compile", help="compile a YAML policy to Lua and print it")
    compile_.add_argument("file", type=Path)
    compile_.add_argument("--json", action="store_true", help="print {lua, sha256, version}")
    deploy = sub.add_parser("deploy", help="validate and deploy a policy to a running orchestrator")
    deploy.add_argument("file", type=Path)
    deploy.add_argument("--address", default="127.0.0.1:50051")
    add_client_arguments(deploy)
    deploy.add_argument("--deployer", default=os.environ.get("USER", "cli"))
    deploy.add_argument("--json", action="store_true")
    versions = sub.add_parser("versions", help="list the deployed versions")
    versions.add_argument("--address", default="127.0.0.1:50051")
    add_client_arguments(versions)
    versions.add_argument("--json", action="store_true")
    rollback = sub.add_parser("rollback", help="go back to an earlier version (one call)")
    rollback.add_argument("--to", type=int, default=0, help="version id; default: the one before")
    rollback.add_argument("--address", default="127.0.0.1:50051")
    add_client_arguments(rollback)
    rollback.add_argument("--json", action="store_true")

    add_sim_commands(sub)
    add_debug_commands(sub)
    shadow = sub.add_parser(
        "shadow",
        help="run a candidate beside the active scheduler, without executing it",
        description="start FILE: the candidate decides every cycle on the same context as the "
        "active scheduler; nothing it decides is executed. status: how often they differ. "
        "stop: end it (prints the final figures).",
    )
    shadow_sub = shadow.add_subparsers(dest="shadow_command", required=True, metavar="ACTION")
    shadow_start = shadow_sub.add_parser("start", help="start (or replace) the shadow")
    shadow_start.add_argument("file", type=Path)
    shadow_sub.add_parser("status", help="the diff rate and the latest differences")
    shadow_sub.add_parser("stop", help="stop the shadow")
    for action_parser in shadow_sub.choices.values():
        action_parser.add_argument("--address", default="127.0.0.1:50051")
        add_client_arguments(action_parser)
        action_parser.add_argument("--json", action="store_true")
    sub.add_parser("platform-source", help="print the platform scheduler's Lua source")
    sample = sub.add_parser("sample-context", help="print the sample context as YAML")
    sample.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    sample.add_argument("--platform-mode", action="store_true", help="with tenants and quotas")
    add_auth_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        if args.command in ("serve", "pool-manager"):
            return _serve(args)
        if args.command == "job":
            return asyncio.run(job_command(args))
        if args.command == "auth":
            return auth_command(args)
        if args.command == "bench":
            configure_logging("console", "error")
            from orchestrator.cli.bench import main as bench_main  # noqa: PLC0415 - heavy, rare

            return bench_main(args.output, args.quick)
        configure_logging("console", "error")
        if args.scheduler_command == "test":
            return asyncio.run(_scheduler_test(args))
        if args.scheduler_command in SIM_COMMANDS:
            return asyncio.run(SIM_COMMANDS[args.scheduler_command](args))
        if args.scheduler_command in DEBUG_COMMANDS:
            return asyncio.run(DEBUG_COMMANDS[args.scheduler_command](args))
        if args.scheduler_command in ADMIN_COMMANDS:
            return asyncio.run(ADMIN_COMMANDS[args.scheduler_command](args))
        if args.scheduler_command == "platform-source":
            sys.stdout.write(platform_source())
            return 0
        data = context_to_dict(sample_context(platform_mode=args.platform_mode))
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    except OrchestratorError as exc:  # bad flags, files, policies or contexts alike
        print(f"orchestratord: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    fmt = args.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    configure_logging(fmt, config.log_level)
    # Imported here: the service stack (aiohttp, the pools, the web UI) is half of the
    # CLI's start-up time, and only these two commands need it.
    from orchestrator.api.server import serve  # noqa: PLC0415
    from orchestrator.pools.pool_manager import run_pool_manager  # noqa: PLC0415

    try:
        if args.command == "pool-manager":
            auth = auth_from_arguments(args)
            asyncio.run(run_pool_manager(config, args.orchestrator, auth))
        else:
            asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130
    return 0


async def _scheduler_test(args: argparse.Namespace) -> int:
    path: Path = args.file
    text, language = read_policy(path)
    try:
        source = to_lua(text, language, path.name)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    if args.deadline_ms <= 0:
        raise UsageError("--deadline-ms must be positive")
    if args.context:
        ctx = load_context(args.context)
    elif args.bank:
        ctx = bank_context(args.bank)
    else:
        ctx = sample_context()
    if args.trace or args.profile:
        diagnosis = await diagnose(
            source,
            path.name,
            ctx,
            instrument="trace" if args.trace else "profile",
            language=args.language,
            deadline_ms=args.deadline_ms,
        )
        print(json.dumps(diagnosis.to_json(), indent=2) if args.json else diagnosis.text(source))
        return EXIT_USER if diagnosis.ok else EXIT_FALLBACK
    options = EngineOptions.from_config(SchedulerConfig(deadline_ms=args.deadline_ms), spares=0)
    async with SchedulingEngine(
        user_source=source, user_name=path.name, language=args.language, options=options
    ) as engine:
        result = await engine.schedule(ctx)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(result, ctx))
    return EXIT_USER if result.source == "user" else EXIT_FALLBACK


async def _validate(args: argparse.Namespace) -> int:
    if args.deadline_ms <= 0:
        raise UsageError("--deadline-ms must be positive")
    source, language = read_policy(args.file)
    report = await validate_policy(
        source, args.file.name, language, scheduler=SchedulerConfig(deadline_ms=args.deadline_ms)
    )
    profile = None
    if args.profile and report.lua:
        profile = await diagnose(
            report.lua,
            args.file.name,
            bank_context(LARGEST_BANK_CONTEXT),
            instrument="profile",
            deadline_ms=args.deadline_ms,
        )
    if args.json:
        out = {**report.to_dict(), "summary": report.summary()}
        if profile is not None:
            out["profile"] = profile.to_json()
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.file}: {report.summary()}")
        for case in report.semantics.get("cases", []):
            mark = "ok  " if case["ok"] else "FAIL"
            what = case["decision"] if case["ok"] else case["error"]
            print(f"  {mark} {case['context']:<18} {what}")
        hot_lines = report.speed.get("hot_lines", [])
        if hot_lines:
            print(f"hottest lines on {report.speed['profiled_context']} (profiled):")
            for line in hot_lines:
                print(f"  {args.file.name}:{line['line']:<5} {TIMES}{line['count']:<7} "
                      f"{line['self_ms']:9.3f} ms  {line['text'].strip()}")  # fmt: skip
        if report.speed.get("profile_error"):
            print(f"profile of the slowest bank context: {report.speed['profile_error']}")
        if profile is not None:
            print(f"\nprofile on the {LARGEST_BANK_CONTEXT} bank context:")
            print(profile.text(report.lua))
    return 0 if report.ok else 1


async def _compile(args: argparse.Namespace) -> int:
    source, language = read_policy(args.file)
    if language != "yaml":
        raise UsageError(f"{args.file}: only YAML policies compile; Lua runs as it is")
    try:
        lua = compile_yaml(source, args.file.name)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        version = policy_version(source, "yaml", args.file.name)
        sha = hashlib.sha256(source.encode()).hexdigest()
        print(json.dumps({"lua": lua, "sha256": sha, "version": version}, indent=2))
    else:
        sys.stdout.write(lua)
    return 0


async def _admin(args: argparse.Namespace) -> int:
    """deploy, versions, rollback: through AdminService on a running orchestrator."""
    async with open_channel(args.address, auth_from_arguments(args)) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        try:
            if args.scheduler_command == "deploy":
                source, language = read_policy(args.file)
                reply = await admin.DeployScheduler(pb.DeployRequest(
                    scheduler=pb.SchedulerSource(source=source, language=language,
                                                 name=args.file.name),
                    deployer=args.deployer,
                ))  # fmt: skip
                versions = [reply.version]
            elif args.scheduler_command == "rollback":
                reply = await admin.Rollback(pb.RollbackRequest(version_id=args.to))
                versions = [reply.version] if reply.HasField("version") else []
            else:
                versions = list((await admin.ListVersions(pb.ListVersionsRequest())).versions)
        except aio.AioRpcError as exc:
            print(f"orchestratord: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1 if exc.code() != grpc.StatusCode.UNAVAILABLE else 2
    rows = [MessageToDict(v, preserving_proto_field_name=True) for v in versions]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("the platform scheduler is in charge")
    else:
        for v in versions:
            mark = "*" if v.active else " "
            print(f"{mark} #{v.id:<4} {v.name:<28} {v.version or '-':<8} {v.sha256[:12]} "
                  f"{v.reason:<24} {v.deployer} - {v.summary}")  # fmt: skip
    return 0


async def _shadow(args: argparse.Namespace) -> int:
    """shadow start FILE | stop | status, through AdminService."""
    async with open_channel(args.address, auth_from_arguments(args)) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        try:
            if args.shadow_command == "start":
                source, language = read_policy(args.file)
                status = await admin.StartShadow(
                    pb.SchedulerSource(source=source, language=language, name=args.file.name)
                )
            elif args.shadow_command == "stop":
                status = await admin.StopShadow(pb.StopShadowRequest())
            else:
                status = (await admin.GetStatus(pb.GetStatusRequest())).shadow
        except aio.AioRpcError as exc:
            print(f"orchestratord: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1 if exc.code() != grpc.StatusCode.UNAVAILABLE else 2
    if args.json:
        print(json.dumps(MessageToDict(status, preserving_proto_field_name=True), indent=2))
        return 0
    if not status.name:
        print("no shadow scheduler")
        return 0
    state = "running" if status.active else "stopped"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(status.by_kind.items()))
    print(f"shadow {status.name} ({state}): {status.cycles} cycles, {status.differing} differ "
          f"({status.diff_rate:.1%}){': ' + kinds if kinds else ''}; {status.skipped} skipped, "
          f"{status.fallbacks} fell back")  # fmt: skip
    for line in status.recent:
        print(f"  {line}")
    return 0


ADMIN_COMMANDS = {
    "shadow": _shadow,
    "validate": _validate,
    "compile": _compile,
    "deploy": _admin,
    "versions": _admin,
    "rollback": _admin,
}


def render(result: CycleResult, ctx: Context) -> str:
    lines = [
        f"context:  {len(ctx.queue)} queued jobs, {len(ctx.pools)} pools, "
        f"{len(ctx.workers_by_id)} workers",
        f"source:   {result.source}",
        f"latency:  {result.latency_ms:.2f} ms",
    ]
    if result.error is not None:
        lines.append(f"fallback: {result.error.kind}: {result.error.message}")
        trace = result.error.traceback.removeprefix(result.error.message).strip()
        lines.extend("          " + tb for tb in trace.splitlines())
    actions = decisions.flatten(result.decision)
    lines.append("decision:" if len(actions) > 1 else f"decision: {_line(result.decision)}")
    if len(actions) > 1:
        lines.extend(f"  {i + 1}. {_line(a)}" for i, a in enumerate(actions))
    if result.logs:
        lines.append("logs:")
        lines.extend(f"  [{line.level}] {line.message}" for line in result.logs)
    if result.metrics:
        lines.append("metrics:")
        lines.extend(f"  {name} = {value:g}" for name, value in result.metrics)
    return "\n".join(lines)


def _line(action: decisions.Decision) -> str:
    text = decisions.describe(action)
    return f"{text}  [rule: {action.rule}]" if action.rule else text
