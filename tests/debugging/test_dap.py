"""`scheduler debug`, driven by a real DAP client over TCP: the real command in a
subprocess, a real diagnostics sandbox worker behind it.

What a client sees: capabilities, breakpoints (plain, conditional, refused), the stop,
the stack, scopes, locals, ctx expanded down to a job's fields, read-only evaluation,
stepping, and the decision in `terminated`. The deadline: suspended while stopped,
enforced while running (the platform scheduler's decision then). And the doors: a
non-loopback --dap is refused; a malformed message does not bring the server down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli.debug import cycle_context, loopback_address
from orchestrator.domain import decision as decisions
from orchestrator.domain.errors import NotFoundError, UsageError
from orchestrator.domain.samples import sample_context
from orchestrator.policy.compile import compile_yaml
from orchestrator.state.decision_log import DecisionLog
from tests.conftest import REPO, EngineFactory

EXAMPLES = REPO / "schedulers" / "examples"
SIMPLE_PRIORITY = EXAMPLES / "runtime-7.1-simple-priority.lua"  # lua-runtime-spec 7.1
BATCH_OPTIMIZED = EXAMPLES / "programmable-6.2-batch-optimized.lua"  # programmable spec 6.2
TIMEOUT_S = 30.0

HELPER_CALL = """\
local function pick(ctx, job)
  local worker = ctx.find_least_loaded_worker(job.model_ref)
  return worker
end

function schedule(ctx)
  local job = ctx.queue[1]
  local worker = pick(ctx, job)
  if worker then
    return { action = "dispatch", job_id = job.id, worker_id = worker.id }
  end
  return { action = "wait" }
end
"""

RUNAWAY = """\
function schedule(ctx)
  local spins = 0
  while true do
    spins = spins + 1
  end
end
"""


class DapClient:
    """A DAP client: numbered requests, their responses, and the events between."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seq = 0
        self.events: list[dict[str, Any]] = []

    def send(self, data: bytes) -> None:
        self.writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(data), data))

    async def message(self) -> dict[str, Any] | None:
        try:
            header = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
        except asyncio.IncompleteReadError:
            return None
        length = int(re.search(rb"Content-Length: (\d+)", header)[1])  # type: ignore[index]
        message: dict[str, Any] = json.loads(await self.reader.readexactly(length))
        return message

    async def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.seq += 1
        sent = {"seq": self.seq, "type": "request", "command": command, "arguments": arguments}
        self.send(json.dumps(sent).encode())
        while True:
            message = await self.message()
            assert message is not None, f"the connection closed before answering {command}"
            if message["type"] == "event":
                self.events.append(message)
            elif message["request_seq"] == self.seq:
                assert message["command"] == command
                return message

    async def event(self, name: str) -> dict[str, Any]:
        """The next `name` event (seen already, or yet to come); its body."""
        return (await self.first_of(name))[1]

    async def first_of(self, *names: str) -> tuple[str, dict[str, Any]]:
        """The first event named one of `names`: its name and body."""
        for event in self.events:
            if event["event"] in names:
                self.events.remove(event)
                return event["event"], event.get("body", {})
        while True:
            message = await self.message()
            assert message is not None, f"the connection closed before a {names} event"
            assert message["type"] == "event", message
            if message["event"] in names:
                return message["event"], message.get("body", {})
            self.events.append(message)

    async def ok(self, command: str, **arguments: Any) -> dict[str, Any]:
        response = await self.request(command, **arguments)
        assert response["success"], response
        return response.get("body", {})  # type: ignore[no-any-return]

    async def configure(
        self, path: Path, breakpoints: list[dict[str, Any]], *, stop_on_entry: bool = False
    ) -> list[dict[str, Any]]:
        """VS Code's opening: initialize, launch, (initialized) setBreakpoints,
        configurationDone. The breakpoints as the adapter answered them."""
        capabilities = await self.ok("initialize", adapterID="lua", linesStartAt1=True)
        assert capabilities["supportsConfigurationDoneRequest"]
        assert capabilities["supportsConditionalBreakpoints"]
        assert capabilities["supportsEvaluateForHovers"]
        await self.ok("launch", program=str(path), stopOnEntry=stop_on_entry)
        await self.event("initialized")
        answer = await self.ok(
            "setBreakpoints", source={"path": str(path)}, breakpoints=breakpoints
        )
        await self.ok("configurationDone")
        return answer["breakpoints"]  # type: ignore[no-any-return]

    async def top_frame(self) -> dict[str, Any]:
        return (await self.ok("stackTrace", threadId=1))["stackFrames"][0]  # type: ignore[no-any-return]

    async def evaluate(self, expression: str, frame: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "evaluate", expression=expression, frameId=frame["id"], context="repl"
        )

    async def children(self, reference: int, **paging: Any) -> dict[str, dict[str, Any]]:
        body = await self.ok("variables", variablesReference=reference, **paging)
        return {v["name"]: v for v in body["variables"]}


async def start_command(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """`scheduler debug ARGS --dap 127.0.0.1:0` started; the port it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli", "scheduler", "debug", *args,
        "--dap", "127.0.0.1:0",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)).decode()
    found = re.fullmatch(r"listening for a DAP client on 127\.0\.0\.1:(\d+)\n", line)
    if found is None:
        proc.kill()
        pytest.fail(f"no address printed: {line!r} {(await proc.stderr.read()).decode()}")
    return proc, int(found[1])


@contextlib.asynccontextmanager
async def debugging(*args: str) -> AsyncIterator[DapClient]:
    """A DAP client connected to a `scheduler debug` of its own, with a deadline that a
    loaded test machine does not miss unless `args` give one. The command must exit 0
    once the client has gone, with nothing on stderr (no traceback)."""
    if "--deadline-ms" not in args:
        args = (*args, "--deadline-ms", "10000")
    proc, port = await start_command(*args)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield DapClient(reader, writer)
    finally:
        writer.close()
        try:
            _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode(), err.decode()


@pytest.mark.parametrize("language", ["luajit", "lua54"])
async def test_a_session_stops_shows_ctx_evaluates_steps_and_ends_with_the_decision(
    language: str,
) -> None:
    """lua-runtime-spec 7.1 on the sample context, as VS Code would drive it."""
    async with debugging("--file", str(SIMPLE_PRIORITY), "--language", language) as client:
        # Line 5: `local worker = ctx.find_least_loaded_worker(job.model_ref)`.
        assert await client.configure(SIMPLE_PRIORITY, [{"line": 5}]) == [
            {"verified": True, "line": 5}
        ]
        stopped = await client.event("stopped")
        assert stopped["reason"] == "breakpoint" and stopped["threadId"] == 1
        assert (await client.ok("threads"))["threads"] == [{"id": 1, "name": "schedule"}]

        frame = await client.top_frame()
        assert (frame["name"], frame["line"]) == ("schedule", 5)
        assert frame["source"]["path"] == str(SIMPLE_PRIORITY.resolve())

        scopes = (await client.ok("scopes", frameId=frame["id"]))["scopes"]
        assert [s["name"] for s in scopes] == ["Locals", "Upvalues", "Globals"]
        local = await client.children(scopes[0]["variablesReference"])
        assert local["ctx"]["type"] == "ctx"
        assert local["job"]["type"] == "job" and "job-1" in local["job"]["value"]

        # ctx -> queue -> its first job -> the job's fields, each expanded on demand.
        fields = await client.children(local["ctx"]["variablesReference"])
        queue = fields["queue"]
        assert queue["indexedVariables"] == 5
        jobs = await client.children(
            queue["variablesReference"], filter="indexed", start=0, count=5
        )
        assert list(jobs) == ["[1]", "[2]", "[3]", "[4]", "[5]"]
        assert all(j["type"] == "job" for j in jobs.values())
        job = await client.children(jobs["[1]"]["variablesReference"])
        assert job["id"]["value"] == '"job-1"'
        assert job["priority"]["value"] == '"interactive"'
        assert job["model_ref"]["value"] == '"llama-8b"'

        # Read-only evaluation: names, fields, operators and ctx's query built-ins...
        answer = await client.evaluate('job.id .. " wants " .. job.model_ref', frame)
        assert answer["success"] and answer["body"]["result"] == '"job-1 wants llama-8b"'
        assert (await client.evaluate("#ctx.queue", frame))["body"]["result"] == "5"
        answer = await client.evaluate("ctx.find_least_loaded_worker(job.model_ref).id", frame)
        assert answer["success"] and answer["body"]["result"] == '"worker-4"'
        # ... but nothing that runs the script's code, has side effects or assigns.
        for expression in ("schedule(ctx)", 'ctx.log_info("hi")', "function() end"):
            answer = await client.evaluate(expression, frame)
            assert not answer["success"] and "read-only" in answer["message"], answer
        assert not (await client.evaluate('job.id = "job-9"', frame))["success"]
        job = await client.children(jobs["[1]"]["variablesReference"])
        assert job["id"]["value"] == '"job-1"'

        await client.ok("next", threadId=1)
        assert (await client.event("stopped"))["reason"] == "step"
        assert (await client.top_frame())["line"] == 6

        await client.ok("continue", threadId=1)
        terminated = await client.event("terminated")
        assert terminated == {
            "decision": {"action": "dispatch", "job_id": "job-1", "worker_id": "worker-4"},
            "source": "user",
            "valid": True,
        }
        output = (await client.event("output"))["output"]
        assert "[info] Dispatching interactive job: job-1" in output
        assert "decision (valid): dispatch job-1 -> worker-4" in output
        assert (await client.event("exited")) == {"exitCode": 0}
        await client.ok("disconnect")


@pytest.mark.parametrize("language", ["luajit", "lua54"])
async def test_step_in_and_out_of_a_function_of_the_script(tmp_path: Path, language: str) -> None:
    script = tmp_path / "helper.lua"
    script.write_text(HELPER_CALL)
    async with debugging("--file", str(script), "--language", language) as client:
        await client.configure(script, [], stop_on_entry=True)
        assert (await client.event("stopped"))["reason"] == "entry"
        assert (await client.top_frame())["line"] == 7

        await client.ok("next", threadId=1)
        await client.event("stopped")
        assert (await client.top_frame())["line"] == 8

        await client.ok("stepIn", threadId=1)
        await client.event("stopped")
        frames = (await client.ok("stackTrace", threadId=1))["stackFrames"]
        assert [(f["name"], f["line"]) for f in frames] == [("pick", 2), ("schedule", 8)]
        # The caller's frame: `pick` is one of its upvalues.
        scopes = (await client.ok("scopes", frameId=frames[1]["id"]))["scopes"]
        upvalues = next(s for s in scopes if s["name"] == "Upvalues")
        assert "pick" in await client.children(upvalues["variablesReference"])

        await client.ok("stepOut", threadId=1)
        await client.event("stopped")
        frame = await client.top_frame()
        assert frame["name"] == "schedule" and frame["line"] in (8, 9)

        await client.ok("continue", threadId=1)
        terminated = await client.event("terminated")
        assert terminated["decision"]["job_id"] == "job-1" and terminated["source"] == "user"
        await client.ok("disconnect")


async def test_a_conditional_breakpoint_stops_only_where_its_condition_holds() -> None:
    """programmable-scheduler-spec 6.2: its loop reaches line 8 for every queued job."""
    async with debugging("--file", str(BATCH_OPTIMIZED)) as client:
        points = await client.configure(
            BATCH_OPTIMIZED,
            [
                {"line": 8, "condition": 'job.id == "job-2"'},
                {"line": 11},  # return { action = "dispatch", ... }
                {"line": 9, "condition": "job.id =="},  # does not compile
            ],
        )
        assert [p["verified"] for p in points] == [True, True, False]
        assert "line 9" in points[2]["message"]

        stops = []
        while (event := await client.first_of("stopped", "terminated"))[0] == "stopped":
            frame = await client.top_frame()
            job_id = (await client.evaluate("job.id", frame))["body"]["result"]
            stops.append((frame["line"], job_id))
            await client.ok("continue", threadId=1)
        terminated = event[1]
        # Line 8 ran for job-1, job-4, job-5, job-2 and job-3; it stopped for job-2 only.
        assert stops == [(8, '"job-2"'), (11, '"job-3"')]
        assert terminated["decision"]["job_id"] == "job-3"
        await client.ok("disconnect")


async def test_the_deadline_is_suspended_while_stopped() -> None:
    async with debugging("--file", str(SIMPLE_PRIORITY), "--deadline-ms", "200") as client:
        await client.configure(SIMPLE_PRIORITY, [{"line": 5}])
        await client.event("stopped")
        await asyncio.sleep(1.0)  # five deadlines, stopped
        await client.ok("continue", threadId=1)
        terminated = await client.event("terminated")
        assert (terminated["source"], terminated["valid"]) == ("user", True)
        assert terminated["decision"]["job_id"] == "job-1"
        await client.ok("disconnect")


async def test_the_deadline_is_enforced_while_running(
    tmp_path: Path, make_engine: EngineFactory
) -> None:
    """A loop after a continue: killed past 50 ms of running time, and the cycle ends
    with what production would do, the platform scheduler's decision."""
    script = tmp_path / "runaway.lua"
    script.write_text(RUNAWAY)
    platform = await make_engine(user_spares=0, platform_spares=0)
    expected = (await platform.schedule(sample_context())).decision
    async with debugging("--file", str(script), "--deadline-ms", "50") as client:
        # Line 2 is the first: a breakpoint there stops on entry.
        await client.configure(script, [{"line": 2}])
        assert (await client.event("stopped"))["reason"] == "breakpoint"
        await asyncio.sleep(0.2)  # stopped: not running time
        started = time.monotonic()
        await client.ok("continue", threadId=1)
        terminated = await client.event("terminated")
        assert time.monotonic() - started >= 0.05
        assert terminated == {
            "decision": decisions.to_dict(expected),
            "source": "platform-fallback",
            "valid": False,
        }
        output = (await client.event("output"))["output"]
        assert (
            "the scheduler ran past its 50 ms deadline (running time; stops excluded); "
            "production falls back to the platform scheduler: " + decisions.describe(expected)
        ) in output
        assert (await client.event("exited")) == {"exitCode": 3}
        await client.ok("disconnect")


async def test_bad_input_is_answered_a_second_client_turned_away_and_terminate_obeyed() -> None:
    async with debugging("--file", str(SIMPLE_PRIORITY)) as client:
        # One client at a time: another connection is closed at once.
        port = client.writer.get_extra_info("peername")[1]
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(other_reader.read(), TIMEOUT_S) == b""
        other_writer.close()

        client.send(b"{not json")
        answer = await client.message()
        assert answer is not None and answer["type"] == "response"
        assert not answer["success"] and "not JSON" in answer["message"]
        client.send(b'{"seq": 1, "type": "request", "command": "initialize", "arguments": 7}')
        answer = await client.message()
        assert answer is not None and not answer["success"]
        assert (await client.ok("initialize", adapterID="lua"))["supportsConditionalBreakpoints"]
        await client.ok("launch")
        await client.event("initialized")
        answer = await client.request("pause", threadId=1)
        assert not answer["success"] and "not supported" in answer["message"]
        answer = await client.request("stackTrace", threadId=1, levels="all")
        assert not answer["success"] and "'levels'" in answer["message"]

        await client.ok("terminate")
        assert "ended by the client" in (await client.event("output"))["output"]
        assert await client.event("terminated") == {}
        # Past 1 MiB the stream cannot be trusted: the adapter says why and hangs up.
        client.writer.write(b"Content-Length: 2000000\r\n\r\n")
        closing = await client.message()
        assert closing is not None and "2000000 bytes" in closing["body"]["output"]
        assert await client.message() is None


async def test_a_yaml_policy_is_debugged_as_the_lua_it_compiles_to() -> None:
    policy = EXAMPLES / "programmable-3.2-determinism-first.yaml"
    async with debugging("--file", str(policy)) as client:
        await client.ok("initialize", adapterID="lua")
        await client.ok("launch", stopOnEntry=True)
        await client.event("initialized")
        notice = (await client.event("output"))["output"]
        found = re.search(r"debugs the Lua it compiles to, (\S+\.lua); set breakpoints in", notice)
        assert found is not None, notice
        compiled = Path(found[1])
        assert compiled.read_text() == compile_yaml(policy.read_text(), policy.name)
        # The YAML's lines are not the Lua's: breakpoints go in the compiled file.
        answer = await client.ok(
            "setBreakpoints", source={"path": str(policy)}, breakpoints=[{"line": 3}]
        )
        assert answer["breakpoints"] == [
            {"verified": False, "line": 3, "message": f"this session debugs {compiled} only"}
        ]
        await client.ok("configurationDone")
        assert (await client.event("stopped"))["reason"] == "entry"
        assert (await client.top_frame())["source"]["path"] == str(compiled)
        await client.ok("continue", threadId=1)
        assert (await client.event("terminated"))["source"] == "user"
        await client.ok("disconnect")
    assert not compiled.exists()


async def test_from_log_takes_the_context_of_the_cycle_with_that_seq(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = await make_engine(user_spares=0, platform_spares=0)
    log = DecisionLog(tmp_path / "decisions", max_file_bytes=2**20, keep_files=2)
    engine.decision_log = log
    first = sample_context()
    later = dataclasses.replace(first, now_ms=first.now_ms + 1000, queue=first.queue[1:])
    await engine.schedule(first)
    await engine.schedule(later)
    log.close()
    directory = tmp_path / "decisions"
    ctx = cycle_context(argparse.Namespace(context=None, from_log=2, log=directory))
    assert (ctx.now_ms, [j.id for j in ctx.queue]) == (later.now_ms, [j.id for j in later.queue])
    with pytest.raises(NotFoundError, match="no cycle with seq 7; it holds seqs 1 to 2"):
        cycle_context(argparse.Namespace(context=None, from_log=7, log=directory))
    with pytest.raises(UsageError, match="--from-log SEQ and --log PATH go together"):
        cycle_context(argparse.Namespace(context=None, from_log=2, log=None))


@pytest.mark.parametrize("address", ["0.0.0.0:4711", "192.168.1.10:4711", "example.com:4711"])
def test_a_dap_address_off_loopback_is_refused(address: str) -> None:
    with pytest.raises(UsageError, match="loopback address only"):
        loopback_address(address)


@pytest.mark.parametrize(
    ("address", "bound"),
    [
        ("127.0.0.1:4711", ("127.0.0.1", 4711)),
        ("localhost:0", ("127.0.0.1", 0)),
        ("[::1]:4711", ("::1", 4711)),
    ],
)
def test_loopback_addresses_are_accepted(address: str, bound: tuple[str, int]) -> None:
    assert loopback_address(address) == bound


def test_the_command_refuses_a_public_dap_address_before_loading_anything() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "scheduler", "debug", "--file",
         str(SIMPLE_PRIORITY), "--dap", "0.0.0.0:4711"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no TLS or authentication" in proc.stderr and "listening" not in proc.stdout
