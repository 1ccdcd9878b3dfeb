-- Trace, profile and the step debugger (issue 18): the only file that holds the debug
-- library's hooks and frame inspection. In the security-review set.
--
-- The hooks belong to the runtime, never to a script: the prelude captures
-- debug.sethook, getinfo, getlocal, getupvalue and getmetatable into a table (D) that
-- loader.lua hands to this file alone; scripts keep their `debug` with traceback only.
-- Nothing here is active unless the worker was started for diagnostics (runtime.py
-- calls `set_mode` only then): the production path runs no hook and no wrapper.
--
-- What a hook sees is filtered to the script's own file (its chunk name): trusted
-- files, the platform scheduler and built-ins are never traced, stepped or shown.
-- Built-ins are timed and recorded by wrappers put on ctx for the call; the hook is
-- off inside them, and back on inside any function of the script a built-in calls
-- (a predicate), so a built-in's own lines cost nothing to trace.
--
-- The debugger stops by calling `wait`, a function runtime.py hands in for the call
-- (it blocks the worker thread until the next command arrives over the Debug RPC).
-- It lives in an upvalue of this file only. While stopped, the hook is not running
-- user code, and inspecting never runs any: values are read raw, summaries never call
-- a metamethod, and `evaluate` compiles an expression that may read names and fields
-- and call only ctx's query built-ins (and math, type, tonumber).
return function(P, D, text, proxies, ctx_module, B, env_module)
  local type, pairs, next, select, tostring = P.type, P.pairs, P.next, P.select, P.tostring
  local rawget, rawlen, setmetatable = P.rawget, P.rawlen, P.setmetatable
  local pcall, error, t_sort, t_concat, t_unpack = P.pcall, P.error, P.t_sort, P.t_concat,
    P.t_unpack
  local s_sub, s_format, s_find = P.s_sub, P.s_format, P.s_find
  local m_floor = P.m_floor
  local compile, make_env = env_module.compile, env_module.make_env
  local sethook, getinfo, getlocal, getupvalue = D.sethook, D.getinfo, D.getlocal, D.getupvalue
  local getmetatable = D.getmetatable
  local clock = D.clock  -- replaced by runtime.py's clock while instrumenting (set_mode)
  local utf8_clean = text.utf8_clean
  local master_of, proxy_next = proxies.master_of, proxies.proxy_next
  local lazy_ctx, use_builtins = ctx_module.lazy_ctx, ctx_module.use_builtins

  local mode = nil          -- nil, "trace", "profile" or "debug"
  local source = nil        -- the script's chunk name, as getinfo reports it
  local last_line = 0       -- its last line: a line event past it is not the script's
  local max_steps, max_calls = 10000, 1000
  local wait = nil          -- debug only: send an event, get the next command
  local globals = {}        -- the script's environment (host.load)
  local base_names = nil    -- what every environment holds: not the script's own globals

  ------------------------------------------------------------------ short forms
  -- A value as a line of text: raw reads only, no metamethod, bounded.
  local SHORT = 120
  local function clip(s, n)
    s = utf8_clean(s)
    if #s > n then return s_sub(s, 1, n - 3) .. "..." end
    return s
  end

  local function number_text(v)
    if v == m_floor(v) and v > -1e15 and v < 1e15 then return s_format("%d", v) end
    return s_format("%.6g", v)
  end

  local short
  local function table_short(t, budget)
    if lazy_ctx[t] then return "ctx" end
    local master = master_of[t]
    if master ~= nil then
      return "job " .. tostring(t.id) .. " (" .. tostring(t.priority) .. ", "
        .. tostring(t.model_ref) .. ")"
    end
    local n = rawlen(t)
    if n > 0 then
      local parts = {}
      for i = 1, (n < 3 and n or 3) do parts[i] = short(rawget(t, i), budget - 1) end
      return "[" .. n .. ": " .. t_concat(parts, ", ") .. (n > 3 and ", ...]" or "]")
    end
    local id = rawget(t, "id")
    local keys, count = {}, 0
    for k in next, t do
      count = count + 1
      if count <= 64 and type(k) == "string" then keys[#keys + 1] = k end
    end
    if count == 0 then return "{}" end
    if type(id) == "string" or type(id) == "number" then
      return "{id=" .. short(id, 0) .. ", " .. count .. " fields}"
    end
    t_sort(keys)
    local parts = {}
    for i = 1, (#keys < 3 and #keys or 3) do
      parts[i] = keys[i] .. "=" .. short(rawget(t, keys[i]), budget - 1)
    end
    return "{" .. t_concat(parts, ", ") .. (count > #parts and ", ...}" or "}")
  end

  short = function(v, budget)
    local kind = type(v)
    if kind == "string" then return '"' .. clip(v, 40) .. '"' end
    if kind == "number" then return number_text(v) end
    if kind == "table" then
      if budget <= 0 then
        if lazy_ctx[v] then return "ctx" end
        if master_of[v] ~= nil then return "job " .. tostring(v.id) end
        return "{...}"
      end
      return table_short(v, budget)
    end
    if kind == "nil" or kind == "boolean" then return tostring(v) end
    return kind
  end

  local function short_list(n, ...)
    local parts = {}
    for i = 1, n do parts[i] = short((select(i, ...)), 1) end
    return clip(t_concat(parts, ", "), SHORT)
  end

  ------------------------------------------------------------------ the record
  local line_index, lines, counts, self_time, line_function = {}, {}, {}, {}, {}
  local steps, step_count, steps_dropped = {}, 0, 0
  local calls, calls_dropped = {}, 0
  local function_calls, function_names, builtin_stats = {}, {}, {}
  local current_line, last_index, last_clock, started_clock = 0, nil, 0, 0
  -- LuaJIT reports a line again when code of another file ran in the middle of it (a
  -- metamethod of ctx or of a job) and it resumes: that is not the line running again.
  -- (A loop written on one line that reads ctx in each pass is counted once per pass
  -- only on Lua 5.4.)
  local repeats_after_calls = P.IS_LUAJIT
  local left_file, current_defined = false, -1
  local schedule_defined, schedule_fn = -1, nil

  local function reset_record()
    line_index, lines, counts, self_time, line_function = {}, {}, {}, {}, {}
    steps, step_count, steps_dropped = {}, 0, 0
    calls, calls_dropped = {}, 0
    function_calls, function_names, builtin_stats = {}, {}, {}
    current_line, last_index, last_clock = 0, nil, 0
    left_file, current_defined = false, -1
  end

  local hook, hook_mask  -- the hook of the call in progress, set by start()

  local function record_line(line, linedefined)
    local index = line_index[line]
    if index == nil then
      index = #lines + 1
      line_index[line], lines[index], counts[index], self_time[index] = index, line, 0, 0
      line_function[index] = linedefined
    end
    counts[index] = counts[index] + 1
    current_defined = linedefined
    step_count = step_count + 1
    if step_count <= max_steps then steps[step_count] = index - 1
    else steps_dropped = steps_dropped + 1 end
    current_line = line
    return index
  end

  local function trace_hook(event, line)
    if line ~= nil and line > last_line then  -- past the script's end: trusted code
      left_file = true
      return
    end
    local info = getinfo(2, "S")
    if info.source ~= source then
      left_file = true
      return
    end
    if event == "line" and left_file and repeats_after_calls and line == current_line
        and info.linedefined == current_defined then
      left_file = false
      return
    end
    left_file = false
    if event ~= "line" then  -- a return (or Lua 5.1's "tail return"): one call ended
      local defined = info.linedefined
      if defined == schedule_defined then return end
      function_calls[defined] = (function_calls[defined] or 0) + 1
      if function_names[defined] == nil then
        local named = getinfo(2, "n")
        function_names[defined] = named and named.name
          or (info.what == "main" and "main chunk") or nil
      end
      return
    end
    if mode == "profile" then
      local now = clock()
      if last_index ~= nil then self_time[last_index] = self_time[last_index] + (now - last_clock) end
      last_index = record_line(line, info.linedefined)
      last_clock = now  -- one clock read per line: the hook's own cost is in the figures
    else
      record_line(line, info.linedefined)
    end
  end

  ------------------------------------------------------------------ built-ins
  -- Each built-in the script calls runs with the hook off; a function of the script
  -- it calls back (a predicate) runs with it on again.
  local inside = false  -- a built-in called by the script is running

  local function pack(...) return { n = select("#", ...), ... } end

  local function hooked(fn)
    return function(...)
      -- A new call of the script's function: its first line is not a repeat of the
      -- line that called the built-in.
      local line, defined = current_line, current_defined
      current_line, inside = -1, false
      sethook(hook, hook_mask)
      local r = pack(pcall(fn, ...))
      sethook()
      current_line, current_defined, left_file, inside = line, defined, true, true
      if not r[1] then error(r[2], 0) end
      return t_unpack(r, 2, r.n)
    end
  end

  local function wrap_args(n, ...)
    local args = pack(...)
    for i = 1, n do
      if type(args[i]) == "function" then args[i] = hooked(args[i]) end
    end
    return args
  end

  local function wrap(name, fn)
    return function(...)
      if inside then return fn(...) end
      local n = select("#", ...)
      local args = wrap_args(n, ...)
      local step, line = step_count, current_line
      inside = true
      sethook()
      local t0 = clock()
      local r = pack(pcall(fn, t_unpack(args, 1, n)))
      local spent = clock() - t0
      inside, left_file = false, true
      if mode ~= "debug" then
        local stats = builtin_stats[name]
        if stats == nil then stats = { 0, 0 } builtin_stats[name] = stats end
        stats[1], stats[2] = stats[1] + 1, stats[2] + spent
        if #calls < max_calls then
          calls[#calls + 1] = {
            name = name, args = short_list(n, ...), line = line, step = step,
            raised = not r[1], ms = spent * 1000,
            result = r[1] and short_list(r.n - 1, t_unpack(r, 2, r.n))
              or clip(text.safe_tostring(r[2]), SHORT),
          }
        else
          calls_dropped = calls_dropped + 1
        end
      end
      sethook(hook, hook_mask)
      if not r[1] then error(r[2], 0) end
      return t_unpack(r, 2, r.n)
    end
  end

  local wrapped = {}
  for name, fn in pairs(B) do wrapped[name] = wrap(name, fn) end

  ------------------------------------------------------------------ the debugger
  local breakpoints = {}   -- line -> true, or a compiled condition
  local step_mode, step_depth = nil, 0
  -- Where the last stop was: LuaJIT reports a line again when a call on it returns, and
  -- a step must leave the line it stopped on.
  local stop_line, moved = 0, true
  local at_entry = false
  -- Variables references, valid while stopped: a table to expand, or a scope (name ->
  -- {value}) of a frame.
  local refs, scopes, ref_count = {}, {}, 0
  local frames = {}               -- the frames of the current stop, innermost first
  local PAGE = 100

  local function new_ref(value)
    ref_count = ref_count + 1
    refs[ref_count] = value
    return ref_count
  end

  local function new_scope_ref(scope)
    ref_count = ref_count + 1
    scopes[ref_count] = scope
    return ref_count
  end

  -- Names a read-only expression may call besides ctx's query built-ins.
  local SIDE_EFFECTS = {
    log_debug = true, log_info = true, log_warn = true, log_error = true,
    emit_metric = true, refresh_pool_state = true, find_worker_round_robin = true,
    platform_schedule = true,
  }
  local callable = {}
  for name, fn in pairs(wrapped) do
    if not SIDE_EFFECTS[name] then callable[fn] = true callable[B[name]] = true end
  end

  local function refused()
    error("evaluate is read-only: it may call ctx's query built-ins, math, type and "
      .. "tonumber, nothing else", 2)
  end

  -- A value as an expression sees it: functions not on the list refuse to run; ctx and
  -- a table with a metatable of the script's are seen through a view that reads raw
  -- (ctx: through its own, trusted, __index) and guards what it reads, so that no
  -- metamethod of the script runs. Jobs keep their metatable: it is the runtime's.
  -- Plain tables are themselves (so that `#` works on LuaJIT, which ignores __len);
  -- a function read from one can only be called in the forms the compiler allows.
  local guard
  local views, viewed = setmetatable({}, { __mode = "k" }), setmetatable({}, { __mode = "k" })
  local function view_of(t)
    local view = views[t]
    if view == nil then
      local read = lazy_ctx[t] and function(k) return t[k] end or function(k) return rawget(t, k) end
      view = setmetatable({}, {
        __index = function(_, k) return guard(read(k)) end,
        __newindex = function() error("evaluate is read-only", 2) end,
        __metatable = false,
      })
      views[t], viewed[view] = view, t
    end
    return view
  end
  guard = function(v)
    local kind = type(v)
    if kind == "function" then return callable[v] and v or refused end
    if kind == "table" and master_of[v] == nil and (lazy_ctx[v] or getmetatable(v) ~= nil) then
      return view_of(v)
    end
    return v
  end
  local function unwrap(v)
    if type(v) == "table" and viewed[v] ~= nil then return viewed[v] end
    return v
  end

  -- The globals an expression may call, whatever the script named its own: the math
  -- library (a copy captured before any script ran), type and tonumber.
  local SAFE_GLOBALS = { math = D.math, type = type, tonumber = P.tonumber }

  -- Source text with strings and comments blanked, for the `function` check.
  local function code_only(expr)
    return (expr:gsub("%-%-%[%[.-%]%]", " "):gsub("%-%-[^\n]*", " ")
      :gsub('"[^"]*"', '""'):gsub("'[^']*'", "''"):gsub("%[%[.-%]%]", '""'))
  end

  -- Compiles `expr` against a scope (name -> value, a frame's locals over its
  -- upvalues); returns a function of no argument, or nil and an error.
  local function compile_expression(expr, scope)
    if type(expr) ~= "string" or #expr == 0 or #expr > 1024 then
      return nil, "an expression is 1 to 1024 characters"
    end
    local code = code_only(expr)
    if s_find(code, "%f[%w_]function%f[^%w_]") then
      return nil, "evaluate is read-only: no function definitions"
    end
    if s_find(code, "[%w_%]%)]%s*:%s*[%a_]") then
      return nil, "evaluate is read-only: no method calls"
    end
    if s_find(code, "[%w_%]%)]%s*[{\"']") or s_find(code, "[%w_%]%)]%s*%[%[") then
      return nil, "evaluate is read-only: call with parentheses, ctx's query built-ins only"
    end
    -- Every call is ctx.NAME(...), math.NAME(...), type(...) or tonumber(...): a
    -- function stored in a plain table of the script is not guarded (see guard).
    for callee in code:gmatch("([%w_%.%]%)]*)%s*%(") do
      if callee ~= "" and callee ~= "and" and callee ~= "or" and callee ~= "not"
          and not (s_find(callee, "^ctx%.[%a_][%w_]*$")
          or s_find(callee, "^math%.[%a_][%w_]*$") or callee == "type" or callee == "tonumber") then
        return nil, "evaluate is read-only: it may call ctx's query built-ins, math, type and "
          .. "tonumber, not " .. callee
      end
    end
    local env = setmetatable({}, {
      __index = function(_, k)
        if SAFE_GLOBALS[k] ~= nil then return SAFE_GLOBALS[k] end
        local found = scope[k]
        if found ~= nil then return guard(found.value) end
        return guard(rawget(globals, k))
      end,
      __newindex = function() error("evaluate is read-only", 2) end,
      __metatable = false,
    })
    return compile("return " .. expr, "=evaluate", env)
  end

  -- The locals (over the upvalues) of the function running at `level`, as seen from
  -- the caller of this function.
  local function scope_at(level)
    level = level + 1
    local scope = {}
    local info = getinfo(level, "f")
    if info and info.func then
      local i = 1
      while true do
        local name, value = getupvalue(info.func, i)
        if name == nil then break end
        scope[name] = { value = value }
        i = i + 1
      end
    end
    local i = 1
    while true do
      local name, value = getlocal(level, i)
      if name == nil then break end
      if s_sub(name, 1, 1) ~= "(" then scope[name] = { value = value } end
      i = i + 1
    end
    return scope
  end

  local function variable(name, value)
    local kind = type(value)
    local v = { name = name, value = short(value, 1), type = kind, reference = 0,
                indexed = 0, named = 0 }
    if kind == "table" then
      if lazy_ctx[value] then v.type = "ctx"
      elseif master_of[value] ~= nil then v.type = "job" end
      v.reference = new_ref(value)
      if master_of[value] == nil and not lazy_ctx[value] then v.indexed = rawlen(value) end
    end
    return v
  end

  -- A table's children: array items (paged), then the other keys in sorted order.
  -- ctx shows its lazy fields too; a job shows its fields.
  local function children(t, start, count)
    local out = {}
    if count <= 0 or count > PAGE then count = PAGE end
    if master_of[t] ~= nil then
      local keys = {}
      for k in proxy_next, t, nil do keys[#keys + 1] = k end
      t_sort(keys)
      for _, k in pairs(keys) do out[#out + 1] = variable(k, t[k]) end
      return out
    end
    local n = lazy_ctx[t] and 0 or rawlen(t)
    if n > 0 then
      for i = start + 1, (start + count < n and start + count or n) do
        out[#out + 1] = variable("[" .. i .. "]", rawget(t, i))
      end
      if start > 0 then return out end
    end
    local keys = {}
    local is_ctx = lazy_ctx[t]
    if is_ctx then ctx_module.materialize(t) end
    for k, v in next, t do
      local item = type(k) == "number" and k >= 1 and k <= n and k == m_floor(k)
      -- ctx's built-ins are its methods, not its data.
      if not item and not (is_ctx and type(v) == "function") then keys[#keys + 1] = k end
    end
    t_sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for i = 1, (#keys < PAGE and #keys or PAGE) do
      local k = keys[i]
      out[#out + 1] = variable(type(k) == "string" and k or "[" .. short(k, 0) .. "]", rawget(t, k))
    end
    return out
  end

  local function as_list(scope)
    local names = {}
    for name in pairs(scope) do names[#names + 1] = name end
    t_sort(names)
    local out = {}
    for i, name in pairs(names) do out[i] = variable(name, scope[name].value) end
    return out
  end

  -- The frames of the script, innermost first, from `level` (as seen by the caller).
  local function capture_frames(level)
    level = level + 1
    frames = {}
    while true do
      local info = getinfo(level, "Snlf")
      if info == nil then break end
      if info.source == source then
        local locals, upvalues, i = {}, {}, 1
        while true do
          local name, value = getlocal(level, i)
          if name == nil then break end
          if s_sub(name, 1, 1) ~= "(" then locals[name] = { value = value } end
          i = i + 1
        end
        i = 1
        while true do
          local name, value = getupvalue(info.func, i)
          if name == nil then break end
          if name ~= "_ENV" then upvalues[name] = { value = value } end
          i = i + 1
        end
        local scope = {}
        for k, v in pairs(upvalues) do scope[k] = v end
        for k, v in pairs(locals) do scope[k] = v end
        frames[#frames + 1] = {
          id = #frames + 1,
          name = info.func == schedule_fn and "schedule" or info.name
            or ("function at line " .. tostring(info.linedefined)),
          line = info.currentline,
          locals = new_scope_ref(locals),
          upvalues = new_scope_ref(upvalues),
          scope = scope,
        }
      end
      level = level + 1
    end
  end

  local function user_global_scope()
    if base_names == nil then base_names = make_env("info") end
    local out = {}
    for k, v in next, globals do
      if type(k) == "string" and rawget(base_names, k) == nil then out[k] = { value = v } end
    end
    return out
  end

  -- The number of frames above the caller, plus 2: comparable between calls from the
  -- same function (the hook), which is all stepping needs.
  local function stack_depth()
    local level = 2
    while getinfo(level, "l") do level = level + 1 end
    return level
  end

  local function answer(name, a, b, c)
    if name == "stack" then
      local out = {}
      for i, f in pairs(frames) do
        out[i] = { id = f.id, name = f.name, line = f.line, locals = f.locals,
                   upvalues = f.upvalues }
      end
      return { kind = "frames", frames = out, globals = new_scope_ref(user_global_scope()) }
    elseif name == "variables" then
      if scopes[a] ~= nil then return { kind = "variables", variables = as_list(scopes[a]) } end
      local target = refs[a]
      if target == nil then return { kind = "error", message = "no such variables reference" } end
      return { kind = "variables", variables = children(target, b or 0, c or 0) }
    elseif name == "evaluate" then
      local frame = frames[(a and a > 0) and a or 1]
      if frame == nil then return { kind = "error", message = "no such frame" } end
      local fn, err = compile_expression(b, frame.scope)
      if not fn then return { kind = "error", message = clip(text.safe_tostring(err), 512) } end
      local ok, value = pcall(fn)
      if not ok then return { kind = "error", message = clip(text.safe_tostring(value), 512) } end
      return { kind = "evaluated", variable = variable(b, unwrap(value)) }
    end
    return { kind = "error", message = "unknown command " .. tostring(name) }
  end

  local set_breakpoints  -- below

  -- Stopped: tell the client, then answer its commands until it resumes. `level` is the
  -- level of the script's function as seen by the caller.
  local function stop(reason, line, level)
    refs, scopes, ref_count = {}, {}, 0
    capture_frames(level + 1)
    local event = { kind = "stopped", reason = reason, line = line }
    while true do
      local name, a, b, c = wait(event)
      if name == "resume" then
        step_mode = a ~= "continue" and a or nil
        -- As the hook will see it: this function is one frame deeper than the hook.
        step_depth, stop_line, moved = stack_depth() - 1, line, false
        return
      elseif name == "detach" then
        step_mode, breakpoints = nil, {}
        return
      elseif name == "breakpoints" then
        event = set_breakpoints(a, b)
      else
        event = answer(name, a, b, c)
      end
    end
  end

  local function condition_holds(condition, level)
    local fn = compile_expression(condition.text, scope_at(level + 1))
    if not fn then return false end
    local ok, value = pcall(fn)
    return ok and value ~= nil and value ~= false
  end

  set_breakpoints = function(lines_given, conditions)
    local set, out_lines, out_conditions = {}, {}, {}
    for i = 1, rawlen(lines_given) do
      local line, condition = lines_given[i], conditions[i]
      if condition == nil or condition == "" then
        set[line] = true
        out_lines[#out_lines + 1], out_conditions[#out_conditions + 1] = line, ""
      else
        local ok, err = compile_expression(condition, {})
        if ok then
          set[line] = { text = condition }
          out_lines[#out_lines + 1], out_conditions[#out_conditions + 1] = line, condition
        else
          return { kind = "error", message = "line " .. tostring(line) .. ": " .. tostring(err) }
        end
      end
    end
    breakpoints = set
    return { kind = "breakpoints", lines = out_lines, conditions = out_conditions }
  end

  local function debug_hook(event, line)
    if line > last_line then return end  -- past the script's end: trusted code
    -- Until the script reaches another of its lines, the line it stopped on is the
    -- same run of it (LuaJIT reports it again after a metamethod or a call returns).
    if not moved and line ~= stop_line and getinfo(2, "S").source == source then
      moved = true
    end
    local bp = breakpoints[line]
    if bp == nil and step_mode == nil and not at_entry then return end
    local info = getinfo(2, "S")
    if info.source ~= source then return end
    if line == stop_line and not moved then return end
    current_line = line
    local reason
    if at_entry then
      at_entry, reason = false, "entry"
    elseif step_mode ~= nil then
      local depth = stack_depth()
      if step_mode == "step_in" or (step_mode == "next" and depth <= step_depth)
          or (step_mode == "step_out" and depth < step_depth) then
        reason = "step"
      end
    end
    if reason == nil and bp ~= nil and (bp == true or condition_holds(bp, 2)) then
      reason = "breakpoint"
    end
    if reason then stop(reason, line, 2) end
  end

  ------------------------------------------------------------------ host side
  -- runtime.py: the mode of the next calls ("trace", "profile", "debug" or nil).
  -- `clock_fn`: seconds, from runtime.py. os.clock reads the process's CPU clock, which
  -- in a hardened worker may move in steps of milliseconds: too coarse for a line.
  local function set_mode(new_mode, chunkname, lines_in_source, steps_bound, calls_bound,
                          wait_fn, clock_fn)
    mode, source, last_line = new_mode, chunkname, lines_in_source or 0
    max_steps, max_calls = steps_bound or max_steps, calls_bound or max_calls
    wait, clock = wait_fn, clock_fn or D.clock
  end

  -- host.load: the script's environment, for the debugger's Globals and evaluate.
  local function set_globals(env) globals = env end

  -- host.lua, before ctx is built and `schedule` runs.
  local function start(schedule)
    if mode == nil then return end
    reset_record()
    use_builtins(wrapped)
    inside = false
    -- Called once, by the runtime; counted here because a script's `return f(x)` is
    -- a tail call, whose return the hook never sees as schedule's.
    local defined = getinfo(schedule, "S").linedefined
    function_names[defined], function_calls[defined] = "schedule", 1
    schedule_defined, schedule_fn = defined, schedule
    if mode == "debug" then
      hook, hook_mask = debug_hook, "l"
      at_entry, step_mode = true, nil
    elseif mode == "profile" then
      hook, hook_mask = trace_hook, "lr"  -- returns too, for the calls per function
    else
      hook, hook_mask = trace_hook, "l"
    end
    -- Interpreted only, while instrumented: LuaJIT's compiled code calls no hook (a
    -- loop compiled by an earlier plain run would vanish from the trace), and each
    -- sethook of the built-in wrappers would flush the compiled code again.
    if D.jit_off then D.jit_off() D.jit_flush() end
    -- Jobs of a fresh snapshot are built now, as a worker in steady state holds them:
    -- else each job's first read would run the builder's lines under the hook, and a
    -- trusted line costs the hook as much as a line of the script.
    for proxy, m in next, master_of do
      if type(m) == "number" then proxy_next(proxy, nil) end
    end
    started_clock = clock()
    last_clock = started_clock
    sethook(hook, hook_mask)
  end

  -- host.lua, once the script has returned (or failed).
  local function finish()
    if mode == nil then return end
    sethook()
    local now = clock()
    if last_index ~= nil then self_time[last_index] = self_time[last_index] + (now - last_clock) end
    use_builtins(nil)
    refs, scopes, frames = {}, {}, {}
    if D.jit_on then D.jit_on() end
  end

  -- runtime.py: the record of the last call, as plain tables.
  local function record()
    local out_lines = {}
    for i = 1, #lines do
      out_lines[i] = { lines[i], counts[i], self_time[i] * 1000 }
    end
    local functions = {}
    local own = {}
    for i = 1, #lines do
      local defined = line_function[i]
      own[defined] = (own[defined] or 0) + self_time[i]
    end
    for defined, spent in pairs(own) do
      functions[#functions + 1] = {
        function_names[defined] or ("function at line " .. defined), defined,
        function_calls[defined] or 0, spent * 1000,
      }
    end
    for name, stats in pairs(builtin_stats) do
      functions[#functions + 1] = { "ctx." .. name, 0, stats[1], stats[2] * 1000 }
    end
    return out_lines, steps, steps_dropped, calls, calls_dropped, functions,
      (clock() - started_clock) * 1000
  end

  return {
    set_mode = set_mode, set_globals = set_globals, start = start, finish = finish,
    record = record,
  }
end
