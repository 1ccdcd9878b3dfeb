-- The trusted Lua half of the sandbox, put together. sandbox_worker/runtime.py calls
-- this chunk with the source of every .lua file in this directory, before any user
-- code exists; it runs each file as its own chunk ("=sandbox/<file>"), in the fixed
-- order below, hands each one only what it needs, and returns the `host` table that
-- runtime.py drives. README.md says why the files are split and what each may reach.
--
-- Nothing here outlives loading but what the files keep: no global is set, nothing
-- goes into package.loaded, and no table user code can reach names these files or
-- the modules they return.
local sources = ...
local load, assert, error, type, tostring, setmetatable, next = load, assert, error, type,
  tostring, setmetatable, next
local globals = _G

-- Files after the prelude run with no globals at all: everything they use is captured
-- by the prelude or handed to them below, so a global is never read after user code
-- could have changed it. Reading or setting one is an error, not a silent nil.
local no_globals = setmetatable({}, {
  __index = function(_, key)
    error("trusted code read the global '" .. tostring(key) .. "'", 2)
  end,
  __newindex = function(_, key)
    error("trusted code set the global '" .. tostring(key) .. "'", 2)
  end,
  __metatable = false,
})

-- Runs a file and returns what it returns: for the prelude, its two tables; for every
-- other file, a function of the modules it is given.
local loaded = { ["loader.lua"] = true }
local function chunk(file, env)
  local source = sources[file]
  if type(source) ~= "string" then error("sandbox: the trusted file " .. file .. " is missing") end
  loaded[file] = true
  return assert(load(source, "=sandbox/" .. file, "t", env or no_globals))()
end

-- Each file gets its own copy of a module, so that no file can change what another
-- is given; reading a name the module lacks is an error. Files read modules once, when
-- they load. The tables a module holds (master_of, limits, the masters) are shared.
local function give(module, name)
  local copy = {}
  for k, v in next, module do copy[k] = v end
  return setmetatable(copy, {
    __index = function(_, key) error(name .. " has no '" .. tostring(key) .. "'", 2) end,
    __metatable = false,
  })
end

-- The clock: every file that reads now_ms keeps its own copy, for speed, and registers
-- a setter here; host.set_now calls them all.
local clocks = {}
local function on_now(set) clocks[#clocks + 1] = set end
local function set_now(ms)
  for i = 1, #clocks do clocks[i](ms) end
end

-- The security-review set: this file, prelude, text, calls, proxies, env, expression,
-- instrument, decision, host.
local P, R, D = chunk("prelude.lua", globals)
local function prelude() return give(P, "prelude") end
local text = chunk("text.lua")(prelude())
local calls = chunk("calls.lua")(prelude(), give(text, "text"))
local proxies = chunk("proxies.lua")(prelude(), on_now)

-- The context the core has sent, and the per-call copies scripts see.
local context = chunk("context.lua")(prelude(), give(proxies, "proxies"))
local function data() return give(context.view, "context.view") end
local copies = chunk("copies.lua")(prelude(), data(), on_now)

-- The built-ins, by runtime-spec section, in the order the spec lists them. Each file
-- adds its functions to B; ctx.lua puts B's functions on every ctx.
local B = {}
local lib = chunk("builtins/common.lua")(prelude(), data(), give(copies, "copies"))
local function builtins(file, ...)
  chunk("builtins/" .. file)(prelude(), B, give(lib, "lib"), ...)
end
builtins("queue.lua", data())
builtins("pools.lua", data(), give(copies, "copies"), calls.refresh_state)
builtins("workers.lua", give(copies, "copies"))
builtins("gpus.lua", data(), give(copies, "copies"))
builtins("catalog.lua", data(), give(copies, "copies"))
builtins("jobs.lua", data(), on_now)
builtins("quotas.lua", data())
builtins("eviction.lua", data(), on_now)
builtins("utilities.lua", calls.add_log, calls.add_metric, on_now)
builtins("prefix.lua", data(), give(copies, "copies"))
local platform = chunk("builtins/platform.lua")(prelude(), B, give(lib, "lib"))
local helpers_table = chunk("builtins/compat.lua")(prelude(), B, data())
local ctx = chunk("ctx.lua")(prelude(), B, helpers_table, data(), give(copies, "copies"), on_now)

-- The user environment, the decision reader, and the host table runtime.py drives.
local env = chunk("env.lua")(prelude(), R, give(text, "text"), calls.flag_violation,
  calls.add_log, give(proxies, "proxies"), give(ctx, "ctx"))
-- Trace, profile and the debugger: the only file given the debug library (D); the
-- debugger's read-only expressions, interpreted, never compiled.
local expression = chunk("expression.lua")(prelude(), D.math, give(text, "text"),
  give(proxies, "proxies"), give(ctx, "ctx"), B, env.compile)
local instrument = chunk("instrument.lua")(prelude(), D, give(text, "text"),
  give(proxies, "proxies"), give(ctx, "ctx"), B, give(env, "env"),
  give(expression, "expression"))
local read_decision = chunk("decision.lua")(prelude(), give(text, "text"), calls.limits)
local host = chunk("host.lua")(prelude(), give(text, "text"), give(calls, "calls"),
  give(context, "context"), give(ctx, "ctx"), give(env, "env"), read_decision,
  give(platform, "platform"), set_now, give(instrument, "instrument"))

for file in next, sources do
  if not loaded[file] then
    error("sandbox: " .. file .. " is not in the load order (loader.lua)")
  end
end
return host
