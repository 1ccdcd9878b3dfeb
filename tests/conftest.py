"""Shared fixtures: the real Lua runtime in-process, and real engines with real workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator._proto import sandbox_pb2
from orchestrator.domain.context import Context
from orchestrator.domain.samples import sample_context
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine, platform_source
from orchestrator.wire import context as snapshot
from sandbox_worker.runtime import LuaSchedulerRuntime, RunResult

LANGUAGES = ["luajit", "lua54"]
LANGUAGE_ENUM = {"luajit": sandbox_pb2.LANGUAGE_LUAJIT, "lua54": sandbox_pb2.LANGUAGE_LUA54}
REPO = Path(__file__).resolve().parent.parent

# A tiny JSON encoder in Lua, so tests can read back any value a script computes.
# It lives in the test script, not in the runtime: it only uses what scripts can.
LUA_JSON = r"""
local function pack(...) return { n = select("#", ...), ... } end
local function to_json(v, seen)
  seen = seen or {}
  local t = type(v)
  if v == nil then return "null" end
  if t == "boolean" then return tostring(v) end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
    return string.format("%.17g", v)
  end
  if t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
  end
  if t == "table" then
    if seen[v] then return '"<cycle>"' end
    seen[v] = true
    local keys, n, is_array = {}, 0, true
    for k in pairs(v) do n = n + 1; keys[#keys + 1] = k; if type(k) ~= "number" then is_array = false end end
    local out = {}
    if is_array and n > 0 then
      for i = 1, n do out[i] = to_json(v[i], seen) end
      seen[v] = nil
      return "[" .. table.concat(out, ",") .. "]"
    end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do out[#out + 1] = to_json(tostring(k)) .. ":" .. to_json(v[k], seen) end
    seen[v] = nil
    return "{" .. table.concat(out, ",") .. "}"
  end
  return '"<' .. t .. '>"'
end
"""

BIG_LOGS = SandboxLimits(max_log_records=1000, max_log_bytes=4 * 1024 * 1024)


class InProcessRuntime:
    """The worker's real Lua runtime, driven directly (no process, no gRPC)."""

    def __init__(self, language: str, limits: SandboxLimits = BIG_LOGS) -> None:
        self.language = language
        self.limits = limits
        self.runtime: LuaSchedulerRuntime | None = None

    def load(self, source: str, *, platform: str | None = None) -> sandbox_pb2.LoadReply:
        self.runtime = LuaSchedulerRuntime(LANGUAGE_ENUM[self.language])
        return self.runtime.load(
            sandbox_pb2.LoadRequest(
                name="test.lua",
                source=source,
                language=LANGUAGE_ENUM[self.language],
                limits=self.limits.to_proto(),
                platform_source=platform if platform is not None else platform_source(),
                expose_platform_source=True,
            )
        )

    def run(self, ctx: Context | None = None, **flags: bool) -> RunResult:
        assert self.runtime is not None
        if ctx is not None:
            self.runtime.apply_snapshot(snapshot.to_proto(ctx))
        return self.runtime.run(
            flags.get("refresh_available", False), flags.get("pool_state_fresh", False)
        )

    def eval(self, expression: str, ctx: Context | None = None) -> Any:
        """Evaluate a Lua expression with `ctx` in scope; returns its value as JSON data.

        Several return values come back as a list.
        """
        source = (
            LUA_JSON
            + "function schedule(ctx)\n"
            + f"  local results = pack({expression})\n"
            + "  local out = {}\n"
            + "  for i = 1, results.n do out[i] = to_json(results[i]) end\n"
            + "  ctx.log_info('[' .. table.concat(out, ',') .. ']')\n"
            + "  return { action = 'wait' }\n"
            + "end\n"
        )
        reply = self.load(source)
        assert reply.ok, reply.error.message
        result = self.run(ctx if ctx is not None else sample_context())
        assert result.error_kind == 0, (result.error_message, result.traceback)
        values = json.loads(result.logs[-1][1])
        return values[0] if len(values) == 1 else values

    def error_of(self, source: str, ctx: Context | None = None) -> RunResult:
        """Run a script expected to fail; returns the RunResult."""
        reply = self.load(source)
        assert reply.ok, reply.error.message
        return self.run(ctx if ctx is not None else sample_context())


@pytest.fixture(params=LANGUAGES)
def lua(request: pytest.FixtureRequest) -> InProcessRuntime:
    """The real runtime, once per Lua implementation."""
    return InProcessRuntime(request.param)


EngineFactory = Callable[..., Any]


@pytest.fixture
async def make_engine(tmp_path: Path) -> AsyncIterator[EngineFactory]:
    """Start real engines (real worker processes) and stop them after the test."""
    engines: list[SchedulingEngine] = []
    counter = iter(range(1000))

    async def factory(
        user_source: str | None = None,
        *,
        language: str = "luajit",
        user_name: str = "scheduler.lua",
        **options: Any,
    ) -> SchedulingEngine:
        runtime_dir = tmp_path / f"e{next(counter)}"
        runtime_dir.mkdir()
        options.setdefault("user_spares", 1)
        options.setdefault("platform_spares", 1)
        platform = options.pop("platform", None)
        # The engine's own arguments; everything else is an EngineOptions field.
        own = {name: options.pop(name) for name in ("metrics", "tenant") if name in options}
        engine = SchedulingEngine(
            user_source=user_source,
            user_name=user_name,
            language=language,
            platform=platform,
            options=EngineOptions(runtime_dir=runtime_dir, **options),
            **own,
        )
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.close()


@pytest.fixture
def ctx() -> Context:
    return sample_context()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition` on the running loop until it holds; fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)
