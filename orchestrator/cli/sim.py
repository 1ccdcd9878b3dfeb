"""`orchestratord scheduler simulate | compare | replay`: flags, progress, output."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TextIO

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain.errors import ConfigError, InvalidRequestError, UsageError
from orchestrator.domain.prefix import MAX_BLOCK_TOKENS, MIN_BLOCK_TOKENS
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import read_policy, to_lua
from orchestrator.sim.compare import Policy, compare
from orchestrator.sim.replay import replay, replay_cycle
from orchestrator.sim.report import table, write_html
from orchestrator.sim.run import Progress, simulate
from orchestrator.sim.settings import MAX_JOBS, SimSettings
from orchestrator.sim.workload import TRACE_FORMATS

PLATFORM = "platform"  # as a policy argument: the built-in platform scheduler


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimSettings()
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--pools", type=int, default=d.pools, help="pools (default %(default)s)")
    cluster.add_argument(
        "--workers-per-pool",
        type=int,
        default=d.workers_per_pool,
        help="workers ready at start in each pool, serving the workload's models in turn "
        "(default %(default)s)",
    )
    cluster.add_argument(
        "--gpus-per-pool",
        type=int,
        default=d.gpus_per_pool,
        help="80 GB A100s per pool (default: one per two workers)",
    )
    cluster.add_argument(
        "--worker-slots",
        type=int,
        default=d.worker_slots,
        help="jobs each worker runs at once, as a batched server (default %(default)s)",
    )
    cluster.add_argument(
        "--start-delay-ms",
        type=int,
        default=d.start_delay_ms,
        help="time for a worker to start and load its model",
    )
    cluster.add_argument("--evict-delay-ms", type=int, default=d.evict_delay_ms)
    cluster.add_argument(
        "--deadline-ms", type=int, default=d.deadline_ms, help="decision deadline, as in production"
    )
    cluster.add_argument(
        "--drain-limit",
        dest="drain_limit_s",
        type=float,
        default=d.drain_limit_s,
        help="seconds after the last arrival that unfinished jobs get; the report then "
        "lists what was left and why (default %(default)s)",
    )
    work = parser.add_argument_group("workload (generated)")
    work.add_argument(
        "--queue-depth",
        type=int,
        default=d.queue_depth,
        help="jobs already queued at t=0 (default %(default)s)",
    )
    work.add_argument(
        "--rate",
        type=float,
        default=d.rate,
        help="Poisson arrivals per second (default %(default)s)",
    )
    work.add_argument(
        "--duration",
        dest="duration_s",
        type=float,
        default=d.duration_s,
        help="seconds of arrivals (default %(default)s)",
    )
    work.add_argument(
        "--jobs",
        type=int,
        default=d.jobs,
        help="stop after this many arrivals instead of --duration",
    )
    work.add_argument(
        "--burst-every",
        dest="burst_every_s",
        type=float,
        default=0.0,
        help="every this many seconds, a burst of --burst-size jobs",
    )
    work.add_argument("--burst-size", type=int, default=0)
    work.add_argument(
        "--interactive",
        type=float,
        default=d.interactive,
        help="share of interactive jobs, 0..1 (default %(default)s)",
    )
    work.add_argument(
        "--tenants",
        default=d.tenants,
        help='tenant mix, e.g. "team-a:3,team-b:1" (default: no tenants)',
    )
    work.add_argument(
        "--models",
        default=d.models,
        help='model mix from the catalog, e.g. "llama-8b:3,qwen-14b:1" '
        "(default: every alias, evenly)",
    )
    work.add_argument("--prompt-tokens", default=d.prompt_tokens, help="MIN-MAX, uniform")
    work.add_argument("--output-tokens", default=d.output_tokens, help="MIN-MAX, uniform")
    work.add_argument("--seed", type=int, default=d.seed, help="same seed, same workload")
    work.add_argument(
        "--conversation",
        type=float,
        default=d.conversation,
        help="share of arrivals, 0..1, that continue an open conversation: the previous "
        "turn's prompt and output plus a new message, so they share its prefix blocks "
        "(default %(default)s: single requests, no sessions)",
    )
    work.add_argument(
        "--block-tokens",
        type=int,
        default=d.block_tokens,
        help=f"tokens of a prompt block for prefix caching, {MIN_BLOCK_TOKENS}.."
        f"{MAX_BLOCK_TOKENS} (default %(default)s; a Mooncake trace needs 512)",
    )
    trace = parser.add_argument_group("workload (trace replay)")
    trace.add_argument(
        "--trace",
        help="a trace file, its format detected from its content: "
        + "; ".join(f"{name}: {what}" for name, what in TRACE_FORMATS.items()),
    )
    trace.add_argument("--speedup", type=float, default=1.0, help="replay time this much faster")
    trace.add_argument(
        "--trace-models",
        default="",
        help='prompt-length ceilings to models, "2048:llama-8b,inf:qwen-14b"',
    )
    trace.add_argument("--trace-limit", type=int, default=0, help="replay only the first N")
    trace.add_argument(
        "--trace-time-unit",
        choices=["auto", "s", "ms"],
        default="auto",
        help="unit of numeric timestamps (auto: ms in JSONL as in the Mooncake traces, s in CSV)",
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        help="an orchestrator config whose catalog to use (default: embedded)",
    )
    parser.add_argument("--language", choices=["luajit", "lua54"], default="luajit")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write report.html, report.json and PNG plots to DIR",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate_ = sub.add_parser(
        "simulate",
        help="simulate a policy on a generated or replayed workload",
        description="Discrete-event simulation on a simulated clock. The policy runs in the "
        "same sandbox, validator and fallback path as in production. Deterministic for a "
        "seed (apart from the measured decision latency).",
    )
    simulate_.add_argument(
        "--file",
        "-f",
        required=True,
        type=Path,
        help=f"the Lua or YAML policy, {PLATFORM!r}, or a template's name (e.g. cache-aware)",
    )
    add_workload_arguments(simulate_)
    compare_ = sub.add_parser(
        "compare",
        help="A/B: two policies on the identical workload, side by side",
        description="Runs A and B on the same arrivals for --replicates seeds (seed, "
        "seed+1, ...). The table shows the first seed; rows marked * differ by more than "
        "twice the standard error of the paired differences across seeds. On a --trace the "
        "seeds draw only which requests are interactive and their tenants: the noise is "
        "that of those draws.",
    )
    compare_.add_argument("a", help=f"policy A (a file, {PLATFORM!r}, or a template's name)")
    compare_.add_argument("b", help=f"policy B (a file, {PLATFORM!r}, or a template's name)")
    compare_.add_argument(
        "--replicates",
        type=int,
        default=3,
        help="seeds to run, for the noise estimate (default %(default)s)",
    )
    add_workload_arguments(compare_)
    replay_ = sub.add_parser(
        "replay",
        help="run a candidate on a decision log and show where it decides differently",
        description="Without --seq: the candidate decides every logged cycle, and the report "
        "counts where it differs from what was executed. With --seq N: the candidate runs on "
        "that one cycle under --trace (the default) or --profile, and the output explains "
        "whether it decides as the service did, and why not.",
    )
    replay_.add_argument(
        "--log",
        required=True,
        type=Path,
        help="a decision log file, or a directory of them (state_dir/decisions)",
    )
    replay_.add_argument("--file", "-f", required=True, type=Path, help="the candidate policy")
    replay_.add_argument("--limit", type=int, default=0, help="replay only the first N cycles")
    replay_.add_argument(
        "--seq", type=int, help="explain one cycle: the log's seq of it (see --json's differences)"
    )
    mode = replay_.add_mutually_exclusive_group()
    mode.add_argument(
        "--trace", action="store_true", help="with --seq: the lines and built-in calls that ran"
    )
    mode.add_argument("--profile", action="store_true", help="with --seq: time per line")
    replay_.add_argument("--language", choices=["luajit", "lua54"], default="luajit")
    replay_.add_argument("--deadline-ms", type=int, default=50)
    replay_.add_argument("--json", action="store_true")
    replay_.add_argument("--quiet", "-q", action="store_true")


# Settings whose flag is not the field's name with dashes.
FLAGS = {"duration_s": "--duration", "burst_every_s": "--burst-every"}


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    """The flags' settings, under the same bounds as a request to the service but a
    higher cap on jobs (MAX_JOBS, not the service's); an error names the flag."""
    names = [n for n in SimSettings.__dataclass_fields__ if hasattr(args, n)]
    try:
        settings = SimSettings(**{n: getattr(args, n) for n in names})
    except InvalidRequestError as exc:
        flag = FLAGS.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise UsageError(f"{flag}{str(exc).removeprefix(exc.field)}") from None
    if settings.expected_jobs() > MAX_JOBS:
        raise UsageError(
            f"the workload holds about {settings.expected_jobs()} jobs; at most {MAX_JOBS}"
        )
    return settings


def load_policy(spec: str) -> Policy:
    """A policy argument: a Lua or YAML file, "platform", or the name of a template
    (schedulers/templates: "cache-aware" is its cache-aware.lua) when no such file
    exists."""
    if spec == PLATFORM:
        return Policy(None, PLATFORM)
    path = Path(spec)
    template = resources.files("schedulers").joinpath("templates", f"{spec}.lua")
    if not path.exists() and "/" not in spec and template.is_file():
        return Policy(template.read_text(), spec)
    text, language = read_policy(path)
    try:
        return Policy(to_lua(text, language, path.name), path.name)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None


def progress_bar(stream: TextIO, enabled: bool) -> Progress | None:
    """A one-line bar redrawn in place, on a terminal only."""
    if not enabled or not stream.isatty():
        return None
    started = time.monotonic()

    def show(fraction: float, message: str) -> None:
        filled = int(fraction * 30)
        bar = "#" * filled + "-" * (30 - filled)
        elapsed = time.monotonic() - started
        stream.write(f"\r[{bar}] {fraction:4.0%} {elapsed:5.1f}s {message[:60]:<60}")
        if fraction >= 1.0:
            stream.write("\n")
        stream.flush()

    return show


def _catalog(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from orchestrator.config.settings import load_catalog, load_config  # noqa: PLC0415

    return load_catalog(load_config(args.catalog)) if args.catalog else None


async def run_simulate(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    policy = load_policy(str(args.file))
    try:
        report = await simulate(
            policy.lua,
            policy.name,
            settings,
            catalog=_catalog(args),
            scheduler=SchedulerConfig(language=args.language),
            progress=progress_bar(sys.stderr, not args.quiet),
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.report:
        page = write_html([report], args.report, f"Simulation of {policy.name}")
        print(f"report: {page}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(table([report]))
    return 0


async def run_compare(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    a, b = load_policy(args.a), load_policy(args.b)
    if a.name == b.name:
        b = Policy(b.lua, f"{b.name} (B)")
    if args.replicates < 1:
        raise UsageError("--replicates must be at least 1")
    try:
        result = await compare(
            a,
            b,
            settings,
            replicates=args.replicates,
            catalog=_catalog(args),
            scheduler=SchedulerConfig(language=args.language),
            progress=progress_bar(sys.stderr, not args.quiet),
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.report:
        title = f"{a.name} against {b.name}"
        page = write_html(result.reports, args.report, title, result.significant, note=result.noise)
        print(f"report: {page}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(table(result.reports, result.significant))
        print(
            f"\n* differs by more than twice the noise (and by 1% or more) across {result.noise}"
            if len(result.replicates) > 1
            else f"\n({result.noise}; see --replicates)"
        )
    return 0


async def run_replay(args: argparse.Namespace) -> int:
    if (args.trace or args.profile) and args.seq is None:
        raise UsageError("--trace and --profile explain one cycle: give its --seq")
    if args.deadline_ms <= 0:
        raise UsageError("--deadline-ms must be positive")
    policy = load_policy(str(args.file))
    assert policy.lua is not None or policy.name == PLATFORM
    from orchestrator.scheduling.engine import platform_source  # noqa: PLC0415

    if args.seq is not None:
        return await _explain_cycle(args, policy.lua or platform_source(), policy.name)
    try:
        report = await replay(
            args.log,
            policy.lua or platform_source(),
            policy.name,
            language=args.language,
            deadline_ms=args.deadline_ms,
            limit=args.limit,
            progress=progress_bar(sys.stderr, not args.quiet),
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0


async def _explain_cycle(args: argparse.Namespace, lua: str, name: str) -> int:
    """`replay --seq N`: the candidate on that cycle, traced or profiled, explained."""
    try:
        explanation, diagnosis = await replay_cycle(
            args.log,
            args.seq,
            lua,
            name,
            instrument="profile" if args.profile else "trace",
            language=args.language,
            deadline_ms=args.deadline_ms,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"explanation": explanation.to_json(), **diagnosis.to_json()}, indent=2))
    else:
        print(explanation.text())
        print()
        print(diagnosis.text(lua))
    return 0


COMMANDS = {"simulate": run_simulate, "compare": run_compare, "replay": run_replay}
