"""The escape corpus: hostile scheduler scripts, each with the outcome it must have.

Outcomes (what the cycle that runs the script must end in):
- violation: the script touched a disabled feature; the cycle falls back and the
  worker is retired, even if the script swallowed the error with pcall;
- lua_error, memory_limit, timeout, invalid_decision, rejected, load_error: the
  cycle falls back, for that reason;
- contained: the script runs, its attack achieves nothing, and it says so itself:
  its decision's reason is "safe" on the second call (the first may only arm it).

`MARKER` in a script is replaced with a path the harness watches: a script that
escaped would create it. Every case also runs under an environment secret that must
not appear in anything the worker returns.
"""

from __future__ import annotations

from dataclasses import dataclass

WAIT = 'return { action = "wait", reason = "done" }'


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    script: str
    expect: frozenset[str]  # acceptable outcomes (usually one)


def case(name: str, category: str, script: str, *expect: str) -> Case:
    return Case(name, category, script, frozenset(expect))


def body(statement: str) -> str:
    """A scheduler whose call runs `statement`, then waits."""
    return f"function schedule(ctx)\n  {statement}\n  {WAIT}\nend\n"


def contained(setup: str, check: str) -> str:
    """First call: `setup` (the attack). Second call: `check`, an expression that is
    true when the attack achieved nothing; the reason says which."""
    return f"""calls = (calls or 0)
function schedule(ctx)
  calls = calls + 1
  if calls == 1 then
    {setup}
    return {{ action = "wait", reason = "armed" }}
  end
  local ok = {check}
  return {{ action = "wait", reason = ok and "safe" or "ESCAPED" }}
end
"""


CASES: list[Case] = [
    # ------------------------------------------------ runtime-spec 6.1: I/O, network, process
    case("io.open write", "6.1 file I/O", body('io.open("MARKER", "w"):write("x")'), "violation"),
    case("io.open read", "6.1 file I/O", body('io.open("/etc/passwd"):read("*a")'), "violation"),
    case("io.write", "6.1 file I/O", body('io.write("x")'), "violation"),
    case("io.lines", "6.1 file I/O", body('for l in io.lines("/etc/passwd") do end'), "violation"),
    case("io.popen", "6.1 file I/O", body('io.popen("touch MARKER")'), "violation"),
    case("os.execute", "6.1 process", body('os.execute("touch MARKER")'), "violation"),
    case("os.remove", "6.1 file I/O", body('os.remove("/tmp")'), "violation"),
    case("os.rename", "6.1 file I/O", body('os.rename("MARKER", "MARKER.2")'), "violation"),
    case("socket.connect", "6.1 network", body('socket.connect("127.0.0.1", 80)'), "violation"),
    case("socket.tcp", "6.1 network", body("socket.tcp()"), "violation"),
    case("os.exit", "6.1 process", body("os.exit(0)"), "violation"),
    case("load", "6.1 code loading", body('load("return 1")()'), "violation"),
    case("loadfile", "6.1 code loading", body('loadfile("/etc/passwd")'), "violation"),
    case("dofile", "6.1 code loading", body('dofile("/etc/passwd")'), "violation"),
    case("require", "6.1 code loading", body('require("os")'), "violation"),
    case("io via _G lookup", "6.1 file I/O", body('_G["io"]["open"]("MARKER", "w")'), "violation"),
    case(
        "pcall swallows io.open",
        "6.1 file I/O",
        body('pcall(io.open, "MARKER", "w")'),
        "violation",
    ),
    # ------------------------------------------------ bytecode
    case("string.dump", "bytecode", body("local b = string.dump(schedule)"), "violation"),
    case("load binary chunk", "bytecode", body('load("\\27LuaT\\0", "x", "b")'), "violation"),
    case("loadstring", "bytecode", body('loadstring("return 1")'), "violation"),
    # A string's methods come from the string metatable's __index.
    case("('').dump", "bytecode", body('local b = ("").dump(schedule)'), "violation"),
    case("('x'):dump()", "bytecode", body('local b = ("x"):dump()'), "violation"),
    case(
        "pcall swallows ('').dump",
        "bytecode",
        body('pcall(function() return ("").dump(schedule) end)'),
        "violation",
    ),
    case(
        "string.dump through a string value",
        "bytecode",
        body('local s = "" local d = s["dump"] local b = d(schedule)'),
        "violation",
    ),
    case(
        "precompiled script",
        "bytecode",
        "\x1bLJ\x02\x00function schedule(ctx) return { action = 'wait' } end",
        "load_error",
    ),
    # ------------------------------------------------ debug
    case("debug.getinfo", "debug", body("debug.getinfo(1)"), "violation"),
    case("debug.sethook", "debug", body('debug.sethook(function() end, "", 1)'), "violation"),
    case("debug.sethook off", "debug", body("debug.sethook()"), "violation"),
    case(
        "debug.getupvalue", "debug", body("debug.getupvalue(ctx.find_ready_worker, 1)"), "violation"
    ),
    case(
        "debug.setupvalue",
        "debug",
        body("debug.setupvalue(ctx.find_ready_worker, 1, nil)"),
        "violation",
    ),
    case("debug.getregistry", "debug", body("debug.getregistry()"), "violation"),
    case("debug.getmetatable", "debug", body('debug.getmetatable("")'), "violation"),
    case("debug.setmetatable", "debug", body('debug.setmetatable("", {})'), "violation"),
    case("debug.getlocal", "debug", body("debug.getlocal(1, 1)"), "violation"),
    case(
        "debug.traceback is allowed",
        "debug",
        contained("tb = debug.traceback('x')", 'type(tb) == "string"'),
        "contained",
    ),
    # ------------------------------------------------ string metatable and shared tables
    case(
        "getmetatable('').__index",
        "metatables",
        contained(
            'local mt = getmetatable("")\n'
            '    if type(mt) == "table" then mt.__index = { upper = function() return "PWNED" end } end',
            '("x"):upper() == "X" and getmetatable("") == false',
        ),
        "contained",
    ),
    case(
        "string metatable not exposed",
        "metatables",
        contained(
            'mt = getmetatable("")',
            'mt == false and ("x"):upper() == "X" and ("%d"):format(5) == "5"',
        ),
        "contained",
    ),
    case(
        "string library patched",
        "metatables",
        contained(
            'string.upper = function() return "PWNED" end\n'
            '    rawset(string, "format", function() return "PWNED" end)',
            '("x"):upper() == "X" and ("%d"):format(5) == "5" and ctx.get_job("job-1") ~= nil',
        ),
        "contained",
    ),
    case(
        "rawset on a job",
        "metatables",
        contained(
            'pcall(rawset, ctx.queue[1], "priority", "batch")\n'
            '    pcall(function() ctx.queue[1].priority = "batch" end)',
            'ctx.get_job("job-1").priority == "interactive" '
            'and rawget(ctx.queue[1], "priority") == "interactive"',
        ),
        "contained",
    ),
    case(
        "setmetatable on a job",
        "metatables",
        contained(
            "pcall(setmetatable, ctx.queue[1], {})",
            'getmetatable(ctx.queue[1]) == "ctx is read-only" and ctx.queue[1].id ~= nil',
        ),
        "contained",
    ),
    case(
        "ctx metatable internals",
        "metatables",
        contained(
            "pcall(function() getmetatable(ctx).__index = nil end)",
            'getmetatable(ctx) == "ctx" and type(ctx.find_ready_worker) == "function"',
        ),
        "contained",
    ),
    case(
        "table library patched",
        "metatables",
        contained(
            "table.sort = function() end; table.insert = nil; rawset(table, 'concat', nil)",
            "ctx.find_least_loaded_worker('llama-8b') ~= nil and #ctx.queue == 5",
        ),
        "contained",
    ),
    # ------------------------------------------------ LuaJIT extensions
    case("setfenv", "LuaJIT", body("setfenv(1, {})"), "violation"),
    case("getfenv", "LuaJIT", body("getfenv(ctx.find_ready_worker)"), "violation"),
    case("ffi.cdef", "LuaJIT", body('ffi.cdef("int getpid(void);")'), "violation"),
    case("ffi.C fork", "LuaJIT", body('ffi.cdef("int fork(void);") ffi.C.fork()'), "violation"),
    case("ffi via require", "LuaJIT", body('local f = require("ffi")'), "violation"),
    case("jit.off", "LuaJIT", body("jit.off()"), "violation"),
    case("jit.util", "LuaJIT", body("jit.util.funcinfo(schedule)"), "violation"),
    # ------------------------------------------------ collectgarbage
    case(
        "collectgarbage collect", "collectgarbage", body('collectgarbage("collect")'), "violation"
    ),
    case("collectgarbage stop", "collectgarbage", body('collectgarbage("stop")'), "violation"),
    case(
        "collectgarbage setpause",
        "collectgarbage",
        body('collectgarbage("setpause", 0)'),
        "violation",
    ),
    case(
        "collectgarbage count is allowed",
        "collectgarbage",
        contained("kb = collectgarbage('count')", 'type(kb) == "number"'),
        "contained",
    ),
    case(
        "__gc finalizer",
        "collectgarbage",
        body("setmetatable({}, { __gc = function() end })"),
        "violation",
    ),
    case("newproxy", "collectgarbage", body("newproxy(true)"), "violation"),
    # ------------------------------------------------ the deadline
    case("busy loop", "timeout", body("while true do end"), "timeout"),
    case(
        "pcall swallows the timeout",
        "timeout",
        body("while true do pcall(function() while true do end end) end"),
        "timeout",
    ),
    case(
        "xpcall swallows the timeout",
        "timeout",
        body("while true do xpcall(function() while true do end end, function() return 1 end) end"),
        "timeout",
    ),
    case(
        "coroutine hides the hook",
        "timeout",
        body("local co = coroutine.wrap(function() while true do end end) co()"),
        "timeout",
    ),
    case(
        "coroutine ping-pong",
        "timeout",
        body(
            "local co = coroutine.wrap(function() while true do coroutine.yield() end end)\n"
            "  while true do co() end"
        ),
        "timeout",
    ),
    case("error retry loop", "timeout", body('while true do pcall(error, "x") end'), "timeout"),
    case(
        "long numeric loop",
        "timeout",
        body("local x = 0 for i = 1, 1e13 do x = x + i end"),
        "timeout",
    ),
    case(
        "deep recursion",
        "stack",
        body("local function f(n) return f(n + 1) + 1 end f(1)"),
        "lua_error",
        "memory_limit",
        "timeout",
    ),
    # ------------------------------------------------ memory bombs
    case("string.rep 1 GiB", "memory", body('local s = string.rep("x", 2^30)'), "memory_limit"),
    case(
        "table growth",
        "memory",
        body("local t = {} for i = 1, 1e9 do t[i] = i end"),
        "memory_limit",
        "timeout",
    ),
    case(
        "concatenation doubling",
        "memory",
        body('local s = "x" while true do s = s .. s end'),
        "memory_limit",
        "timeout",
    ),
    case(
        "table.concat bomb",
        "memory",
        body('local t = {} for i = 1, 2e7 do t[i] = "abcdefgh" end local s = table.concat(t)'),
        "memory_limit",
        "timeout",
    ),
    case(
        "pcall swallows the memory error",
        "memory",
        body(
            'while true do pcall(string.rep, "x", 2^30) local t = {} for i = 1, 1e6 do t[i] = {} end end'
        ),
        "memory_limit",
        "timeout",
    ),
    # ------------------------------------------------ patterns
    case(
        "string.find backtracking",
        "patterns",
        body('local s = string.rep("a", 30000) s:find(".-.-.-.-.-b")'),
        "timeout",
    ),
    case(
        "gsub backtracking",
        "patterns",
        body('local s = string.rep("a", 20000) s:gsub(".-.-.-.-b", "")'),
        "timeout",
    ),
    case(
        "string.format huge width",
        "patterns",
        body('local s = string.format("%099999999d", 1)'),
        "lua_error",
    ),
    # ------------------------------------------------ Python through lupa, the environment
    case("python.eval", "python", body("python.eval(\"__import__('os')\")"), "violation"),
    case("python.builtins", "python", body("python.builtins.open('MARKER', 'w')"), "violation"),
    case(
        "userdata hunt",
        "python",
        contained(
            "found = 0\n"
            "    local seen = {}\n"
            "    local function walk(v, d)\n"
            "      if d > 6 then return end\n"
            "      if type(v) == 'userdata' then found = found + 1 end\n"
            "      if type(v) ~= 'table' or seen[v] then return end\n"
            "      seen[v] = true\n"
            "      for _, x in pairs(v) do walk(x, d + 1) end\n"
            "    end\n"
            "    walk(_G, 0) walk(ctx, 0)",
            "found == 0",
        ),
        "contained",
    ),
    case(
        "os.getenv", "environment", body('local s = os.getenv("ORCH_ESCAPE_SECRET")'), "violation"
    ),
    case("/proc/self/environ", "environment", body('io.open("/proc/self/environ")'), "violation"),
    case("os.tmpname", "environment", body("os.tmpname()"), "violation"),
    case(
        "package.loadlib",
        "environment",
        body('package.loadlib("libc.so.6", "system")'),
        "violation",
    ),
    # ------------------------------------------------ descriptors, sockets, fork (from Lua)
    case("inherited descriptor", "descriptors", body('io.open("/proc/self/fd/3")'), "violation"),
    case(
        "ffi socket",
        "sockets",
        body('ffi.cdef("int socket(int, int, int);") ffi.C.socket(2, 1, 0)'),
        "violation",
    ),
    case("popen fork", "fork", body("io.popen(\"sh -c 'touch MARKER'\")"), "violation"),
    # ------------------------------------------------ ctx across cycles
    case(
        "ctx tables mutated",
        "ctx across cycles",
        contained(
            'ctx.pools[1].status = "offline"; ctx.metrics.queue_depth = -1\n'
            "    table.remove(ctx.queue, 1); ctx.catalog.aliases['llama-8b'] = 'evil'",
            'ctx.pools[1].status == "healthy" and ctx.metrics.queue_depth == 5 and #ctx.queue == 5 '
            "and ctx.catalog.aliases['llama-8b'] ~= 'evil'",
        ),
        "contained",
    ),
    case(
        "built-ins replaced",
        "ctx across cycles",
        contained(
            "ctx.find_ready_worker = function() return { id = 'evil' } end\n"
            "    ctx.helpers.find_worker = nil",
            "ctx.find_ready_worker('llama-8b').id ~= 'evil' and ctx.helpers.find_worker ~= nil",
        ),
        "contained",
    ),
    case(
        "stale ctx kept",
        "ctx across cycles",
        contained(
            "saved = ctx; saved.queue[1] = nil",
            "saved ~= ctx and ctx.queue[1] ~= nil and ctx.queue[1].id == 'job-1'",
        ),
        "contained",
    ),
    case(
        "platform scheduler patched",
        "ctx across cycles",
        contained(
            "platform.schedule = function() return { action = 'evict_worker', worker_id = 'x' } end",
            "ctx.platform_schedule(ctx).action ~= 'evict_worker'",
        ),
        "contained",
    ),
    # ------------------------------------------------ hostile decisions
    case(
        "decision naming a missing job",
        "decisions",
        'function schedule(ctx) return { action = "dispatch", job_id = "nope", worker_id = "worker-1" } end',
        "rejected",
    ),
    case(
        "huge batch",
        "decisions",
        "function schedule(ctx) local a = {} for i = 1, 10000 do a[i] = { action = 'wait' } end "
        "return { action = 'batch', actions = a } end",
        "rejected",
        "invalid_decision",
    ),
    case(
        "cyclic batch",
        "decisions",
        "function schedule(ctx) local d = { action = 'batch' } d.actions = { d } return d end",
        "invalid_decision",
        "rejected",
    ),
    case(
        "decision behind a metatable",
        "decisions",
        "function schedule(ctx) return setmetatable({}, { __index = function(_, k) "
        "if k == 'action' then return 'dispatch' end return 'job-1' end }) end",
        "invalid_decision",
    ),
    case(
        "10 MB reason",
        "decisions",
        'function schedule(ctx) return { action = "wait", reason = string.rep("r", 10 * 2^20) } end',
        "invalid_decision",
        "memory_limit",
        "timeout",  # Lua 5.4's string.rep copies byte by byte: 10 MB takes 45-90 ms here
    ),
    case(
        "decision is a function",
        "decisions",
        "function schedule(ctx) return schedule end",
        "invalid_decision",
    ),
]
