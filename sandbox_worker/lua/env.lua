-- The user environment: an allowlist, built fresh for every load. Runtime-spec
-- section 6, plus the restrictions of docs/ARCHITECTURE.md, D7: no bytecode, no
-- string.dump (nor through a string's methods), no debug but traceback, no ffi or jit,
-- a read-only string metatable, collectgarbage("count") only. Every name left out fails
-- with an error that names it, and the attempt is recorded as a violation even if the
-- script catches the error.
--
-- Nothing here hands user code a trusted table: library tables are copies, the raw
-- functions are wrapped so that read-only jobs stay read-only, and `python` (lupa puts
-- the host's Python in the globals: docs/ARCHITECTURE.md, D6) is a guard, not a copy.
return function(P, R, text, flag_violation, add_log, proxies, ctx)
  local type, pairs, ipairs, next, select = P.type, P.pairs, P.ipairs, P.next, P.select
  local rawget, rawset, rawequal, rawlen = P.rawget, P.rawset, P.rawequal, P.rawlen
  local setmetatable, getmetatable = P.setmetatable, P.getmetatable
  local tostring, tonumber, error, assert = P.tostring, P.tonumber, P.error, P.assert
  local pcall, xpcall = P.pcall, P.xpcall
  local string, table, math, os, coroutine = R.string, R.table, R.math, R.os, R.coroutine
  local utf8_lib, bit_lib = R.utf8, R.bit
  local s_byte = P.s_byte
  local t_insert, t_remove, t_sort, t_concat, t_unpack = P.t_insert, P.t_remove, P.t_sort,
    P.t_concat, P.t_unpack
  local traceback, load, collectgarbage = P.traceback, R.load, R.collectgarbage
  local LUA_VERSION = P.LUA_VERSION
  local safe_tostring = text.safe_tostring
  local master_of, proxy_next, readonly_error = proxies.master_of, proxies.proxy_next,
    proxies.readonly_error
  local lazy_ctx, materialize = ctx.lazy_ctx, ctx.materialize

  local function violation(what, why)
    flag_violation(what)
    error(what .. " is disabled in the scheduler sandbox (" .. why .. ")", 3)
  end

  -- A library table that raises a clear error for the names it leaves out: every
  -- missing name, or only those listed in `forbidden`.
  local function guarded(name, allowed, why, forbidden)
    return setmetatable(allowed, {
      __index = function(_, key)
        if forbidden == nil or forbidden[key] then violation(name .. "." .. tostring(key), why) end
        return nil
      end,
      __metatable = false,
    })
  end

  local function disabled(name, why)
    return function() violation(name, why) end
  end

  local function copy_lib(lib, skip)
    local out = {}
    for k, v in pairs(lib) do
      if not (skip and skip[k]) then out[k] = v end
    end
    return out
  end

  -- Every string's methods: ("").dump reached the real string.dump through the
  -- metatable's __index, which was the real string library. One guarded copy, made
  -- before any script exists and reachable by none (getmetatable("") is false), serves
  -- every environment; a script's own `string` is a copy of its own (make_env).
  R.string_meta.__index = guarded("string", copy_lib(string, { dump = true }), "no bytecode",
    { dump = true })

  local function make_env(print_level)
    local env = {}
    -- Base functions, with the raw ones made proxy-aware so read-only jobs stay read-only.
    env.assert, env.error, env.select, env.type = assert, error, select, type
    env.tostring, env.tonumber, env.pcall, env.xpcall = tostring, tonumber, pcall, xpcall
    env.rawequal, env.ipairs = rawequal, ipairs
    env.next = function(t, k)
      if master_of[t] then return proxy_next(t, k) end
      if lazy_ctx[t] then materialize(t) end
      return next(t, k)
    end
    env.pairs = function(t)
      if master_of[t] then return proxy_next, t, nil end
      if lazy_ctx[t] then materialize(t) end
      return pairs(t)
    end
    env.rawget = function(t, k)
      if master_of[t] or lazy_ctx[t] then return t[k] end
      return rawget(t, k)
    end
    env.rawset = function(t, k, v)
      if master_of[t] then readonly_error(t, k) end
      return rawset(t, k, v)
    end
    if LUA_VERSION ~= "Lua 5.1" then
      env.rawlen = function(t) if master_of[t] then return 0 end return rawlen(t) end
    end
    env.getmetatable = getmetatable
    env.setmetatable = function(t, mt)
      -- A __gc finalizer would run user code inside trusted code, or hang lua_close().
      if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
        violation("setmetatable with __gc", "finalizers are not allowed")
      end
      return setmetatable(t, mt)
    end
    local function no_proxy(fname, t)
      if master_of[t] then error("ctx is read-only: table." .. fname .. " on a queued job", 3) end
    end
    local tbl = copy_lib(table)
    tbl.insert = function(t, ...) no_proxy("insert", t) return t_insert(t, ...) end
    tbl.remove = function(t, ...) no_proxy("remove", t) return t_remove(t, ...) end
    tbl.sort = function(t, ...) no_proxy("sort", t) return t_sort(t, ...) end
    tbl.concat = function(t, ...) no_proxy("concat", t) return t_concat(t, ...) end
    tbl.unpack = t_unpack
    env.table = tbl
    if LUA_VERSION == "Lua 5.1" then env.unpack = t_unpack end

    env.string = guarded("string", copy_lib(string, { dump = true }), "no bytecode", { dump = true })
    env.math = copy_lib(math)
    env.coroutine = copy_lib(coroutine)
    if utf8_lib then env.utf8 = copy_lib(utf8_lib) end
    if bit_lib then env.bit = copy_lib(bit_lib) end
    env.os = guarded("os", { time = os.time, date = os.date, clock = os.clock },
      "only os.time, os.date and os.clock are available")
    env.debug = guarded("debug", {
      traceback = function(...) return traceback(...) end,
    }, "only debug.traceback is available")
    env.io = guarded("io", {}, "no file I/O")
    env.socket = guarded("socket", {}, "no network access")
    env.package = guarded("package", {}, "no modules")
    env.python = guarded("python", {}, "no access to the host")
    env.ffi = guarded("ffi", {}, "no FFI")
    env.jit = guarded("jit", {}, "no JIT control")
    env.load = disabled("load", "no code loading")
    env.loadstring = disabled("loadstring", "no code loading")
    env.loadfile = disabled("loadfile", "no file access")
    env.dofile = disabled("dofile", "no file access")
    env.require = disabled("require", "use the built-ins on ctx")
    env.module = disabled("module", "use the built-ins on ctx")
    env.setfenv = disabled("setfenv", "environments are fixed")
    env.getfenv = disabled("getfenv", "environments are fixed")
    env.newproxy = disabled("newproxy", "no userdata")
    env.gcinfo = disabled("gcinfo", "use collectgarbage('count')")
    env.collectgarbage = function(opt, ...)
      if opt == "count" then return collectgarbage("count") end
      violation("collectgarbage(" .. safe_tostring(opt or "collect") .. ")",
        "only collectgarbage('count') is available")
    end
    env.print = function(...) add_log(print_level, ...) end
    env._VERSION = LUA_VERSION
    env._G = env
    return env
  end

  -- Source only: a chunk that starts with the bytecode signature is refused.
  local function compile(source, chunkname, env)
    if type(source) ~= "string" then return nil, "source must be a string" end
    if s_byte(source, 1) == 27 then return nil, "bytecode is not accepted, only Lua source" end
    return load(source, chunkname, "t", env)
  end

  return { make_env = make_env, compile = compile }
end
