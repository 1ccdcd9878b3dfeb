-- The prelude: runs first, with the real globals, before any user code exists. It
-- captures everything trusted code uses from the global environment, so that no later
-- change to a global can reach trusted code, and returns it as three tables. Every other
-- file gets what it needs from those and reads no globals at all (loader.lua).
--
-- What a runtime lacks (utf8 on LuaJIT, table.clear and bit on Lua 5.4) is false.

-- Scripts share the string metatable with trusted code: hide it, so that
-- getmetatable("").__index cannot be replaced (docs/ARCHITECTURE.md, D7). Its __index
-- is still the real string library, dump included, until env.lua replaces it.
local string_meta = getmetatable("")
string_meta.__metatable = false

local string, table, math = string, table, math

local new_table, clear_table
do
  local ok, tnew = pcall(require, "table.new")
  new_table = ok and tnew or function() return {} end
  local cok, tclear = pcall(require, "table.clear")
  clear_table = cok and tclear or false
end

local next = next

-- Empty a table in place (the context's master tables are never replaced: other
-- files hold them).
local empty = clear_table or function(t)
  for k in next, t do t[k] = nil end
end

local function copy_array(source)
  local n = #source
  local out = new_table(n, 0)
  for i = 1, n do out[i] = source[i] end
  return out
end

-- Flat tables of scalars (metrics, and each section of config).
local function copy_flat(source)
  local out = {}
  for k, v in pairs(source) do out[k] = v end
  return out
end

-- P: captured functions and constants, and the helpers above, for every file.
local P = {
  type = type, pairs = pairs, ipairs = ipairs, next = next, select = select,
  rawget = rawget, rawset = rawset, rawequal = rawequal,
  rawlen = rawlen or function(t) return #t end,
  setmetatable = setmetatable, getmetatable = getmetatable,
  tostring = tostring, tonumber = tonumber, error = error, assert = assert,
  pcall = pcall, xpcall = xpcall,
  s_find = string.find, s_sub = string.sub, s_format = string.format,
  s_byte = string.byte, s_match = string.match,
  t_insert = table.insert, t_remove = table.remove, t_sort = table.sort,
  t_concat = table.concat, t_unpack = table.unpack or unpack,
  m_floor = math.floor, m_ceil = math.ceil, m_max = math.max, m_huge = math.huge,
  traceback = debug.traceback,
  LUA_VERSION = _VERSION,
  IS_LUAJIT = type(jit) == "table",
  new_table = new_table, clear_table = clear_table, empty = empty,
  copy_array = copy_array, copy_flat = copy_flat,
}

-- R: the library tables themselves, the string metatable, `load` and `collectgarbage`:
-- for env.lua only, which copies what user code may have.
local R = {
  string = string, table = table, math = math, os = os, coroutine = coroutine,
  utf8 = utf8 or false, bit = bit or false,
  load = load, collectgarbage = collectgarbage, string_meta = string_meta,
}

-- A monotonic clock in seconds, fine enough to time one line: on LuaJIT, through the
-- FFI (clock_gettime reads the vDSO: tens of nanoseconds, where a call out to Python
-- costs microseconds). The FFI goes no further than this closure. Elsewhere false, and
-- runtime.py hands instrument.lua Python's clock instead.
local monotonic = false
if type(jit) == "table" then
  local ok, ffi = pcall(require, "ffi")
  if ok then
    ffi.cdef([[
      typedef struct { long tv_sec; long tv_nsec; } sandbox_timespec;
      int clock_gettime(int clock, sandbox_timespec *out);
    ]])
    local C, now, CLOCK_MONOTONIC = ffi.C, ffi.new("sandbox_timespec"), 1
    monotonic = function()
      C.clock_gettime(CLOCK_MONOTONIC, now)
      return tonumber(now.tv_sec) + tonumber(now.tv_nsec) * 1e-9
    end
  end
end

-- D: the debug library's hooks and frame inspection, the monotonic clock, for
-- instrument.lua only (trace, profile and the step debugger of diagnostics workers).
local D = {
  monotonic = monotonic,
  sethook = debug.sethook, getinfo = debug.getinfo, getlocal = debug.getlocal,
  getupvalue = debug.getupvalue,
  math = copy_flat(math),
  -- LuaJIT: compiled code calls no hook, and setting a hook flushes what was compiled.
  jit_off = type(jit) == "table" and jit.off or false,
  jit_flush = type(jit) == "table" and jit.flush or false,
  jit_on = type(jit) == "table" and jit.on or false,
}

return P, R, D
