"""`orchestratord job ...`: a small gRPC client for JobService, for people and scripts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf.json_format import MessageToDict
from grpc import aio

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc
from orchestrator.domain.jobs import JobState
from orchestrator.wire.channel import auth_from_arguments, open_channel
from orchestrator.wire.jobs import STATE_NAMES, STATES

# What a worker's text may not send a terminal as it is: the C0 controls but newline
# and tab (ESC starts the sequences that move the cursor, retitle the window or write
# the clipboard), DEL, and the C1 controls (0x9b is a one-character CSI to some).
_TERMINAL_ESCAPES = {
    code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))
    if code not in (0x09, 0x0A)
}  # fmt: skip


def terminal_safe(text: str) -> str:
    """`text` with every control character but newline and tab written as `\\x1b`."""
    return text.translate(_TERMINAL_ESCAPES)


def _print(message: Any) -> None:
    data = MessageToDict(message, preserving_proto_field_name=True)
    print(json.dumps(data, indent=2))


async def _follow(jobs: pb_grpc.JobServiceStub, job_id: str) -> int:
    last: Any = None
    async for event in jobs.Watch(pb.WatchRequest(job_id=job_id)):
        state = STATE_NAMES[event.state].value
        print(f"{state:<10} {event.detail}", file=sys.stderr)
        last = event.job
    if last is not None:
        _print(last)
    return 0 if last is not None and last.state == pb.JOB_STATE_COMPLETED else 1


async def _stream(jobs: pb_grpc.JobServiceStub, job_id: str) -> int:
    """Print the job's output to stdout as it comes, then how it ended to stderr. The
    text is the worker's: on a terminal, its control characters are shown escaped,
    not obeyed; piped, it is written as it came."""
    tty = sys.stdout.isatty()
    attempt = 0
    printed = ""  # the tail of what stdout got, to end it with a newline
    job: Any = None
    async for chunk in jobs.StreamOutput(pb.GetJobRequest(job_id=job_id)):
        if attempt and chunk.attempt != attempt:
            # A failed attempt's text is not the job's: what follows starts it again.
            print(f"\n[attempt {chunk.attempt}: the output starts again]", file=sys.stderr)
        attempt = chunk.attempt or attempt
        if chunk.text:
            printed = terminal_safe(chunk.text) if tty else chunk.text
            sys.stdout.write(printed)
            sys.stdout.flush()
        if chunk.HasField("job"):
            job = chunk.job
    if printed and not printed.endswith("\n"):
        print(flush=True)
    if job is None:
        return 1
    print(_status_line(job), file=sys.stderr)
    return 0 if job.state == pb.JOB_STATE_COMPLETED else 1


def _status_line(job: Any) -> str:
    """`job-… completed tokens=16 ttft=42 ms tpot=3.1 ms` (`-`: what the job did not get to)."""
    ttft = f"{job.ttft_ms} ms" if job.ttft_ms else "-"
    tpot = f"{job.tpot_ms:.1f} ms" if job.tpot_ms else "-"
    state = STATE_NAMES[job.state].value
    line = f"{job.id} {state} tokens={job.tokens_generated} ttft={ttft} tpot={tpot}"
    return f"{line} error={job.error}" if job.error else line


async def job_command(args: argparse.Namespace) -> int:
    """Run one job action; exit 0 on success, 1 when the job did not complete, 2 on errors."""
    async with open_channel(args.address, auth_from_arguments(args)) as channel:
        jobs = pb_grpc.JobServiceStub(channel)
        try:
            if args.job_command == "submit":
                request = pb.SubmitRequest(
                    model=args.model,
                    prompt=args.prompt,
                    max_tokens=args.max_tokens,
                    priority=args.priority,
                    temperature=args.temperature,
                    tenant_id=args.tenant,
                    stop=args.stop,
                )
                if args.seed is not None:
                    request.seed = args.seed
                if args.top_p is not None:
                    request.top_p = args.top_p
                job = await jobs.Submit(request)
                if args.wait:
                    return await _stream(jobs, job.id)
                _print(job)
            elif args.job_command == "get":
                _print(await jobs.Get(pb.GetJobRequest(job_id=args.job_id)))
            elif args.job_command == "cancel":
                _print(await jobs.Cancel(pb.CancelJobRequest(job_id=args.job_id)))
            elif args.job_command == "watch":
                return await _follow(jobs, args.job_id)
            else:
                reply = await jobs.List(
                    pb.ListJobsRequest(
                        states=[STATES[JobState(s)] for s in args.state], limit=args.limit
                    )
                )
                _print(reply)
        except aio.AioRpcError as exc:
            print(f"orchestratord: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    return 0
