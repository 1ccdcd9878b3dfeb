"""The sandbox of runtime-spec section 6 and docs/ARCHITECTURE.md, D7, on both Lua runtimes.

Every disabled feature fails with an error that names it; the attempt counts as a
sandbox violation even when the script swallows the error with pcall, and the
worker is retired. The allowed library keeps working.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import sandbox_worker
from orchestrator._proto import sandbox_pb2
from orchestrator.domain.samples import sample_context
from tests.conftest import InProcessRuntime

VIOLATION = sandbox_pb2.ERROR_KIND_SANDBOX_VIOLATION

# (Lua statement, the name the error must mention)
DISABLED = [
    # runtime-spec 6.1
    ("io.open('/etc/passwd')", "io.open"),
    ("io.write('x')", "io.write"),
    ("io.lines('/etc/passwd')", "io.lines"),
    ("os.execute('touch /tmp/pwned')", "os.execute"),
    ("os.remove('/tmp/x')", "os.remove"),
    ("os.rename('/tmp/x', '/tmp/y')", "os.rename"),
    ("socket.connect('127.0.0.1', 80)", "socket.connect"),
    ("os.exit(1)", "os.exit"),
    ("load('return 1')", "load"),
    ("loadfile('/etc/passwd')", "loadfile"),
    ("dofile('/etc/passwd')", "dofile"),
    ("require('socket')", "require"),
    # docs/ARCHITECTURE.md, D7
    ("string.dump(schedule)", "string.dump"),
    ("debug.getinfo(1)", "debug.getinfo"),
    ("debug.sethook(function() end, '', 1)", "debug.sethook"),
    ("debug.getupvalue(schedule, 1)", "debug.getupvalue"),
    ("debug.setmetatable('', {})", "debug.setmetatable"),
    ("debug.getregistry()", "debug.getregistry"),
    ("setfenv(1, {})", "setfenv"),
    ("getfenv(1)", "getfenv"),
    ("ffi.cdef('int getpid(void);')", "ffi.cdef"),
    ("jit.off()", "jit.off"),
    ("collectgarbage('collect')", "collectgarbage(collect)"),
    ("collectgarbage()", "collectgarbage(collect)"),
    ("loadstring('return 1')", "loadstring"),
    ("os.getenv('HOME')", "os.getenv"),
    ("os.tmpname()", "os.tmpname"),
    ("package.loadlib('libc.so.6', 'system')", "package.loadlib"),
    ("python.eval('1')", "python.eval"),
    ("newproxy(true)", "newproxy"),
    ("setmetatable({}, { __gc = function() end })", "setmetatable with __gc"),
]


@pytest.mark.parametrize(("statement", "name"), DISABLED, ids=[d[1] for d in DISABLED])
def test_disabled_feature_fails_with_clear_error(
    lua: InProcessRuntime, statement: str, name: str
) -> None:
    """Each disabled feature raises '<name> is disabled in the scheduler sandbox'."""
    result = lua.error_of(f"function schedule(ctx) {statement} return {{ action = 'wait' }} end")
    assert result.error_kind == VIOLATION
    assert f"{name} is disabled in the scheduler sandbox" in result.error_message
    assert result.retire, "a worker that saw a violation must not serve again"
    assert result.decision is None


@pytest.mark.parametrize(("statement", "name"), DISABLED[:8], ids=[d[1] for d in DISABLED[:8]])
def test_violation_swallowed_by_pcall_still_counts(
    lua: InProcessRuntime, statement: str, name: str
) -> None:
    """pcall around a disabled call does not hide the attempt: the cycle still falls back."""
    result = lua.error_of(
        f"function schedule(ctx) pcall(function() {statement} end) return {{ action = 'wait' }} end"
    )
    assert result.error_kind == VIOLATION
    assert name.split("(", maxsplit=1)[0] in result.error_message
    assert result.retire


def test_bytecode_is_refused_at_load(lua: InProcessRuntime) -> None:
    """A chunk that starts with the bytecode signature does not load."""
    reply = lua.load("\x1bLuaQ\x00\x01\x04function schedule() end")
    assert not reply.ok
    assert "bytecode" in reply.error.message


def test_syntax_error_names_the_line(lua: InProcessRuntime) -> None:
    """A syntax error is reported with the chunk name and line."""
    reply = lua.load("function schedule(ctx)\n  return {\nend")
    assert not reply.ok
    assert reply.error.message.startswith("test.lua:")


def test_missing_schedule_function_is_a_load_error(lua: InProcessRuntime) -> None:
    """A script that defines no schedule() is refused with a message saying so."""
    reply = lua.load("local x = 1")
    assert not reply.ok
    assert "schedule(ctx)" in reply.error.message


def test_violation_at_load_time_is_refused(lua: InProcessRuntime) -> None:
    """Top-level code that touches a disabled feature fails the load."""
    reply = lua.load("pcall(os.exit)\nfunction schedule(ctx) return {action='wait'} end")
    assert not reply.ok
    assert "os.exit" in reply.error.message


def test_allowed_library_works(lua: InProcessRuntime) -> None:
    """math, string, table, os.time/date/clock, coroutine and debug.traceback are available."""
    values = lua.eval(
        "math.floor(2.5), string.upper('ab'), ('x'):rep(3), table.concat({'a', 'b'}, ','),"
        " type(os.time()), type(os.date('%Y')), type(os.clock()),"
        " type(debug.traceback('m')), coroutine.wrap(function() coroutine.yield(7) end)(),"
        " select('#', 1, 2), tostring(nil), collectgarbage('count') > 0"
    )
    assert values == [
        2,
        "AB",
        "xxx",
        "a,b",
        "number",
        "string",
        "number",
        "string",
        7,
        2,
        "nil",
        True,
    ]


def test_string_metatable_is_hidden(lua: InProcessRuntime) -> None:
    """getmetatable('') does not hand out the shared string metatable."""
    assert lua.eval("getmetatable('')") is False
    assert lua.eval("getmetatable(ctx.queue[1])") == "ctx is read-only"


# Every string's methods are found through the string metatable's __index.
STRING_METHOD_DUMPS = [
    "local d = ('').dump",
    "local b = ('').dump(schedule)",
    "local b = ('x'):dump()",
    "local d = ('x')['du' .. 'mp']",
]


@pytest.mark.parametrize("statement", STRING_METHOD_DUMPS)
def test_string_methods_do_not_reach_string_dump(lua: InProcessRuntime, statement: str) -> None:
    """("").dump is string.dump: a violation, the same as through the string library."""
    result = lua.error_of(f"function schedule(ctx) {statement} return {{ action = 'wait' }} end")
    assert result.error_kind == VIOLATION
    assert "string.dump is disabled in the scheduler sandbox" in result.error_message
    assert result.retire


def test_string_methods_are_the_scripts_string_library(lua: InProcessRuntime) -> None:
    """Every name of the real string library but dump reaches, as a string method, what
    the script's own `string` holds: the metatable offers nothing the library lacks."""
    lua.load("function schedule(ctx) return { action = 'wait' } end")
    assert lua.runtime is not None
    names = sorted(str(k) for k in lua.runtime.lua.globals().string)
    assert "dump" in names and "format" in names
    differing = lua.eval(
        "(function() local out = {} for _, k in ipairs({"
        + ", ".join(f"'{n}'" for n in names if n != "dump")
        + "}) do if ('')[k] ~= string[k] then out[#out + 1] = k end end return out end)()"
    )
    assert differing in ([], {})


def test_string_metatable_index_is_not_the_real_library(lua: InProcessRuntime) -> None:
    """Seen from trusted code: the __index every string uses is a copy without dump."""
    lua.load("function schedule(ctx) return { action = 'wait' } end")
    assert lua.runtime is not None
    real = lua.runtime.lua.eval
    assert real("debug.getmetatable('').__index ~= string")
    assert real("rawget(debug.getmetatable('').__index, 'dump') == nil")
    assert real("type(string.dump) == 'function'"), "trusted code keeps the real library"


def test_no_other_type_has_a_metatable(lua: InProcessRuntime) -> None:
    """Numbers, booleans, nil, functions and coroutines have no metatable to go through."""
    values = lua.eval(
        "getmetatable(1) == nil, getmetatable(true) == nil, getmetatable(nil) == nil,"
        " getmetatable(print) == nil, getmetatable(coroutine.create(print)) == nil"
    )
    assert values == [True] * 5


def test_no_python_objects_reachable(lua: InProcessRuntime) -> None:
    """Nothing in the global environment or ctx is a userdata (a Python object)."""
    found = lua.eval(
        """(function()
          local seen, bad = {}, {}
          local function walk(v, path, depth)
            if depth > 6 then return end
            local t = type(v)
            if t == 'userdata' then bad[#bad + 1] = path end
            if t ~= 'table' or seen[v] then return end
            seen[v] = true
            for k, x in pairs(v) do walk(x, path .. '.' .. tostring(k), depth + 1) end
          end
          walk(_G, '_G', 0)
          walk(ctx, 'ctx', 0)
          return bad
        end)()"""
    )
    assert found in ([], {})


def test_print_goes_to_the_logs(lua: InProcessRuntime) -> None:
    """print() is captured as an info log instead of writing to the worker's stdout."""
    lua.load("function schedule(ctx) print('hello', 42) return {action='wait'} end")
    result = lua.run(sample_context())
    assert result.logs == [("info", "hello 42")]


def test_ctx_mutations_do_not_survive_the_call(lua: InProcessRuntime) -> None:
    """Whatever a script does to ctx is gone at the next call; its own globals persist."""
    lua.load(
        """
        calls = 0
        function schedule(ctx)
          calls = calls + 1
          if calls == 1 then
            ctx.pools[1].status = "offline"
            ctx.pools[1].workers[1].status = "busy"
            ctx.pools[1].workers[1].gpu_ids[1] = 99
            table.remove(ctx.queue, 1)
            ctx.queue[2] = nil
            ctx.metrics.queue_depth = -1
            ctx.config.eviction.vram_threshold = 0
            ctx.catalog.aliases["llama-8b"] = "evil"
            ctx.find_ready_worker = nil
            pcall(function() ctx.get_job("job-1").priority = "batch" end)
          else
            ctx.log_info(ctx.pools[1].status, ctx.pools[1].workers[1].status,
              ctx.pools[1].workers[1].gpu_ids[1], #ctx.queue, ctx.queue[1].id,
              ctx.metrics.queue_depth, ctx.config.eviction.vram_threshold,
              ctx.resolve_model("llama-8b") == ctx.catalog.aliases["llama-8b"],
              type(ctx.find_ready_worker), ctx.get_job("job-1").priority, calls)
          end
          return { action = "wait" }
        end"""
    )
    lua.run(sample_context())
    result = lua.run()  # same worker state, no new snapshot
    assert result.logs == [("info", "healthy ready 0 5 job-1 5 0.9 true function interactive 2")]


def test_invalid_utf8_in_decision_is_rejected_and_logs_are_escaped(lua: InProcessRuntime) -> None:
    """Bytes that are not UTF-8 cannot reach the host as text: ids are refused, logs escaped."""
    lua.load(
        "function schedule(ctx) ctx.log_info('bad \\255 byte')"
        " return { action = 'dispatch', job_id = 'job-\\255', worker_id = 'w' } end"
    )
    result = lua.run(sample_context())
    assert result.error_kind == sandbox_pb2.ERROR_KIND_INVALID_DECISION
    assert "not valid UTF-8" in result.error_message
    assert result.logs == [("info", "bad \\xff byte")]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ("nil", "schedule() returned nil"),
        ("42", "expected a table, got number"),
        ("{}", "missing 'action'"),
        ("{ action = 'fly' }", "unknown action 'fly'"),
        ("{ action = 'dispatch', job_id = 1, worker_id = 'w' }", "'job_id' must be a string"),
        (
            "{ action = 'start_worker', pool_id = 'p', gpu_id = 0.5, model_ref = 'm' }",
            "'gpu_id' must be an integer",
        ),
        ("{ action = 'batch', actions = 'x' }", "'actions' must be a list"),
        (
            "{ action = 'dispatch', job_id = string.rep('j', 5000), worker_id = 'w' }",
            "the limit is 1024",
        ),
        ("setmetatable({}, { __index = function() while true do end end })", "missing 'action'"),
    ],
)
def test_malformed_decisions_are_invalid(
    lua: InProcessRuntime, returned: str, message: str
) -> None:
    """A return value that is not a decision is reported precisely, read with raw access only."""
    result = lua.error_of(f"function schedule(ctx) return {returned} end")
    assert result.error_kind == sandbox_pb2.ERROR_KIND_INVALID_DECISION
    assert message in result.error_message


def test_older_spec_decision_shapes_are_accepted(lua: InProcessRuntime) -> None:
    """{action='evict', evict_worker_id=...} and a nested start_worker table still work."""
    lua.load(
        """function schedule(ctx) return { action = "batch", actions = {
            { action = "evict", evict_worker_id = "worker-3" },
            { action = "start_worker", start_worker = { model_ref = "llama-8b", pool_id = "pool-2", gpu_id = 0 } },
        } } end"""
    )
    result = lua.run(sample_context())
    assert result.decision is not None
    actions = result.decision.batch.actions
    assert actions[0].evict_worker.worker_id == "worker-3"
    assert actions[1].start_worker.model_ref == "llama-8b"
    assert actions[1].start_worker.pool_id == "pool-2"


def test_refresh_pool_state_asks_the_core(lua: InProcessRuntime) -> None:
    """With a refresh available, refresh_pool_state() abandons the call; with fresh state it is true."""
    lua.load(
        "function schedule(ctx) local ok = ctx.refresh_pool_state()"
        " ctx.log_info(tostring(ok)) return { action = 'wait' } end"
    )
    first = lua.run(sample_context(), refresh_available=True)
    assert first.refresh_requested
    second = lua.run(pool_state_fresh=True)
    assert not second.refresh_requested
    assert second.logs == [("info", "true")]


# The trusted Lua files (sandbox_worker/lua/) are run by the host before any user code
# and registered nowhere: a script can neither require, load nor read them.
TRUSTED_LUA = Path(sandbox_worker.__file__).resolve().parent / "lua"
REACH_TRUSTED = [
    ("require('env')", "require"),
    ("require('sandbox/env.lua')", "require"),
    ("require('host')", "require"),
    ("local m = package.loaded['env']", "package.loaded"),
    ("local m = package.loaded", "package.loaded"),
    ("local p = package.path", "package.path"),
    ("local s = package.searchers", "package.searchers"),
    ("local s = package.preload", "package.preload"),
    (f"io.open('{TRUSTED_LUA / 'env.lua'}')", "io.open"),
    (f"io.lines('{TRUSTED_LUA / 'host.lua'}')", "io.lines"),
    (f"loadfile('{TRUSTED_LUA / 'env.lua'}')", "loadfile"),
    (f"dofile('{TRUSTED_LUA / 'loader.lua'}')", "dofile"),
    ("load(string.dump(ctx.get_job))", "string.dump"),
    ("load('\\27LJ\\2', 'x', 'b')", "load"),
    ("debug.getinfo(ctx.get_job, 'S')", "debug.getinfo"),
    ("debug.getupvalue(ctx.find_least_loaded_worker, 1)", "debug.getupvalue"),
    ("debug.upvalueid(ctx.get_job, 1)", "debug.upvalueid"),
    ("debug.getlocal(2, 1)", "debug.getlocal"),
    ("debug.getregistry()", "debug.getregistry"),
    ("getfenv(ctx.get_job)", "getfenv"),
]


@pytest.mark.parametrize(
    ("statement", "name"), REACH_TRUSTED, ids=[r[0][:40] for r in REACH_TRUSTED]
)
def test_trusted_lua_files_cannot_be_reached(
    lua: InProcessRuntime, statement: str, name: str
) -> None:
    """require, package, file access, loaders and debug cannot reach the trusted files."""
    result = lua.error_of(f"function schedule(ctx) {statement} return {{ action = 'wait' }} end")
    assert result.error_kind == VIOLATION
    assert f"{name} is disabled in the scheduler sandbox" in result.error_message
    assert result.retire


# Names the trusted modules export among themselves (sandbox_worker/lua/loader.lua).
TRUSTED_NAMES = [
    "master_of", "job_master_mt", "make_job_proxy", "repoint", "release_all", "proxy_next",
    "readonly_error", "make_env", "compile", "read_decision", "flag_violation", "add_log",
    "add_metric", "refresh_state", "begin", "current", "configure", "limits", "put_jobs",
    "put_snapshot_jobs", "set_builder", "queue_merges", "remove_jobs", "commit", "reset",
    "set_now", "counts", "current_queue", "view", "lazy_ctx",
    "materialize", "worker_copy", "pool_copy", "set_schedule", "set_source", "new_table",
    "copy_flat", "empty", "safe_tostring", "utf8_valid", "IS_LUAJIT", "LUA_VERSION",
]  # fmt: skip


def test_trusted_modules_are_not_reachable(lua: InProcessRuntime) -> None:
    """Nothing reachable from a script's globals or ctx is a trusted module or the sources."""
    names = "{" + ", ".join(f"'{n}'" for n in TRUSTED_NAMES) + "}"
    found = lua.eval(
        f"""(function()
          local trusted = {{}}
          for _, n in ipairs({names}) do trusted[n] = true end
          local seen, bad = {{}}, {{}}
          local function walk(v, path, depth)
            if depth > 8 then return end
            if type(v) == 'string' and (v:find('trusted code read the global', 1, true)
                or v:find('return function(P', 1, true)) then
              bad[#bad + 1] = path
            end
            if type(v) ~= 'table' or seen[v] then return end
            seen[v] = true
            local mt = getmetatable(v)
            if type(mt) == 'table' then walk(mt, path .. '<mt>', depth + 1) end
            for k, x in pairs(v) do
              if trusted[k] then bad[#bad + 1] = path .. '.' .. tostring(k) end
              walk(k, path .. '[key]', depth + 1)
              walk(x, path .. '.' .. tostring(k), depth + 1)
            end
          end
          walk(_G, '_G', 0)
          walk(ctx, 'ctx', 0)
          walk(ctx.helpers, 'ctx.helpers', 0)
          return bad
        end)()"""
    )
    assert found in ([], {})


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("function schedule(ctx) error('boom') end", "run"),
        ("function schedule(ctx) ctx.filter_jobs(function() error('boom') end) end", "run"),
        ("function schedule(ctx) ctx.get_job(1) end", "run"),
        ("function schedule(ctx) io.open('x') end", "run"),
        ("local function f() error('boom') end\nf()\nfunction schedule(ctx) end", "load"),
    ],
)
def test_script_tracebacks_stop_where_trusted_code_called_the_script(
    lua: InProcessRuntime, source: str, where: str
) -> None:
    """A script's traceback holds its own frames (and the built-ins it called), never
    the frames of the trusted code that called it."""
    if where == "load":
        reply = lua.load(source)
        assert not reply.ok
        traceback = reply.error.traceback
    else:
        traceback = lua.error_of(source).traceback
    assert "test.lua:" in traceback
    assert "xpcall" not in traceback
    assert "sandbox/host.lua" not in traceback
    assert "sandbox/loader.lua" not in traceback
