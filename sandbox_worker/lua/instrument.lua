-- Trace, profile and the step debugger (issue 18): the only file that holds the debug
-- library's hooks and frame inspection. In the security-review set.
--
-- The hooks belong to the runtime, never to a script: the prelude captures
-- debug.sethook, getinfo, getlocal and getupvalue into a table (D) that
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
return function(P, D, text, proxies, ctx_module, B, env_module, expression)
  local type, pairs, next, select, tostring = P.type, P.pairs, P.next, P.select, P.tostring
  local rawget, rawlen, rawequal = P.rawget, P.rawlen, P.rawequal
  local pcall, error, t_sort, t_concat, t_unpack = P.pcall, P.error, P.t_sort, P.t_concat,
    P.t_unpack
  local s_sub, s_format, s_find = P.s_sub, P.s_format, P.s_find
  local m_floor = P.m_floor
  local make_env = env_module.make_env
  local sethook, getinfo, getlocal, getupvalue = D.sethook, D.getinfo, D.getlocal, D.getupvalue
  local clock = nil  -- set with the mode (set_mode): D.monotonic, or runtime.py's
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
  -- LuaJIT reports a line again when a Lua function called in the middle of it (one of
  -- the script's, or a metamethod of ctx or of a job) returns to it: that is not the
  -- line running again. A return hook notes the line a Lua function returns to, and
  -- the next report of that very line in that function is skipped.
  local repeats_after_calls = P.IS_LUAJIT
  local resume_line, resume_defined, current_defined = nil, -1, -1
  local schedule_defined, schedule_fn = -1, nil

  local function reset_record()
    line_index, lines, counts, self_time, line_function = {}, {}, {}, {}, {}
    steps, step_count, steps_dropped = {}, 0, 0
    calls, calls_dropped = {}, 0
    function_calls, function_names, builtin_stats = {}, {}, {}
    current_line, last_index, last_clock = 0, nil, 0
    resume_line, current_defined = nil, -1
  end

  -- From a hook, at a return: where LuaJIT will report a line again (see above).
  local function note_return()
    local returning = getinfo(3, "S")
    local caller = returning and returning.what ~= "C" and getinfo(4, "Sl")
    if caller and caller.source == source then
      resume_line, resume_defined = caller.currentline, caller.linedefined
    else
      resume_line = nil
    end
  end

  -- From a hook, at a line of the script: whether it is LuaJIT's report again.
  local function reported_again(line, defined)
    if resume_line == nil then return false end
    local again = line == resume_line and defined == resume_defined
    resume_line = nil
    return again
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
    if event ~= "line" then  -- a return (or Lua 5.1's "tail return"): one call ended
      if repeats_after_calls then note_return() end
      if mode ~= "profile" then return end
      local info = getinfo(2, "S")
      if info.source ~= source then return end
      local defined = info.linedefined
      if defined == schedule_defined then return end
      function_calls[defined] = (function_calls[defined] or 0) + 1
      if function_names[defined] == nil then
        local named = getinfo(2, "n")
        function_names[defined] = named and named.name and clip(named.name, SHORT)
          or (info.what == "main" and "main chunk") or nil
      end
      return
    end
    if line > last_line then return end  -- past the script's end: trusted code
    local info = getinfo(2, "S")
    if info.source ~= source or reported_again(line, info.linedefined) then return end
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
  local active = false  -- an instrumented call is running (start to finish)
  local predicate_error = nil  -- what the script's predicate raised in a built-in

  local function pack(...) return { n = select("#", ...), ... } end

  local function hooked(fn)
    return function(...)
      if not active then return fn(...) end  -- kept by the script past its call
      -- A new call of the script's function: its first line is not a repeat of the
      -- line that called the built-in.
      local line = current_line
      resume_line, inside = nil, false
      sethook(hook, hook_mask)
      local r = pack(pcall(fn, ...))
      sethook()
      current_line, inside = line, true
      if not r[1] then
        predicate_error = r[2]  -- the script's own error: the wrapper leaves it as it is
        error(r[2], 0)
      end
      return t_unpack(r, 2, r.n)
    end
  end

  -- A lazy field of ctx (the queue's merge and copy, say) is built with the hook off,
  -- like a built-in: its cost stays on the line that read it, without the hook's.
  local function quietly(make)
    if inside or not active then return make() end
    inside = true
    sethook()
    local ok, value = pcall(make)
    inside = false
    sethook(hook, hook_mask)
    if not ok then error(value, 0) end
    return value
  end

  local function wrap_args(n, ...)
    local args = pack(...)
    for i = 1, n do
      if type(args[i]) == "function" then args[i] = hooked(args[i]) end
    end
    return args
  end

  local function record_call(name, n, args, r, step, line, spent)
    local stats = builtin_stats[name]
    if stats == nil then stats = { 0, 0 } builtin_stats[name] = stats end
    stats[1], stats[2] = stats[1] + 1, stats[2] + spent
    if #calls >= max_calls then
      calls_dropped = calls_dropped + 1
      return
    end
    calls[#calls + 1] = {
      name = name, args = short_list(n, t_unpack(args, 1, n)), line = line, step = step,
      raised = not r[1], ms = spent * 1000,
      result = r[1] and short_list(r.n - 1, t_unpack(r, 2, r.n))
        or (type(r[2]) == "string" and clip(r[2], SHORT) or short(r[2], 1)),
    }
  end

  local function wrap(name, fn)
    return function(...)
      -- Not while a built-in runs, nor in a later call that is not instrumented (a
      -- script may keep a built-in it read from ctx in a global).
      if inside or not active then return fn(...) end
      local n = select("#", ...)
      local given = pack(...)
      local args = wrap_args(n, ...)
      -- The script's line that called: where a built-in's error points (it raises at
      -- the level of its caller, which the pcall below would otherwise hide), and the
      -- line LuaJIT reports again once the hook is back on in the middle of it.
      local caller = getinfo(2, "Sl")
      local called_by_script = caller ~= nil and caller.source == source
      local line, defined = current_line, current_defined
      if called_by_script then line, defined = caller.currentline, caller.linedefined end
      local step = step_count
      predicate_error = nil
      inside = true
      sethook()
      local t0 = clock()
      local r = pack(pcall(fn, t_unpack(args, 1, n)))
      local spent = clock() - t0
      inside, resume_line, resume_defined = false, line, defined
      if mode ~= "debug" then pcall(record_call, name, n, given, r, step, line, spent) end
      sethook(hook, hook_mask)
      if not r[1] then
        local err = r[2]
        if called_by_script and type(err) == "string" and not rawequal(err, predicate_error)
            and not s_find(err, "^[^\n]-:%d+: ") then
          err = s_sub(source, 2) .. ":" .. line .. ": " .. err
        end
        error(err, 0)
      end
      return t_unpack(r, 2, r.n)
    end
  end

  local wrapped = {}
  for name, fn in pairs(B) do wrapped[name] = wrap(name, fn) end

  ------------------------------------------------------------------ the debugger
  local breakpoints = {}   -- line -> true, or a compiled condition
  local step_mode, step_depth = nil, 0
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

  -- A name's value for an expression: the frame's locals over its upvalues, then the
  -- script's globals (read raw).
  local function lookup_in(scope)
    return function(name)
      local found = scope[name]
      if found ~= nil then return found.value end
      return rawget(globals, name)
    end
  end

  -- Scopes map a name to {value = v} (a value may be nil).

  -- The named locals of the function running at `level`, as seen from the caller of
  -- this function (Lua's temporaries, "(for state)" and the like, left out).
  local function locals_at(level)
    local out, i = {}, 1
    while true do
      local name, value = getlocal(level + 1, i)
      if name == nil then return out end
      if s_sub(name, 1, 1) ~= "(" then out[name] = { value = value } end
      i = i + 1
    end
  end

  local function upvalues_of(func)
    local out, i = {}, 1
    while true do
      local name, value = getupvalue(func, i)
      if name == nil then return out end
      out[name] = { value = value }
      i = i + 1
    end
  end

  -- The locals over the upvalues: what a name in that function's code reads.
  local function merged(upvalues, locals)
    local scope = {}
    for k, v in pairs(upvalues) do scope[k] = v end
    for k, v in pairs(locals) do scope[k] = v end
    return scope
  end

  -- The scope of the function running at `level`, as seen from the caller of this
  -- function.
  local function scope_at(level)
    local info = getinfo(level + 1, "f")
    local upvalues = (info and info.func) and upvalues_of(info.func) or {}
    return merged(upvalues, locals_at(level + 1))
  end

  local function variable(name, value)
    local kind = type(value)
    -- Names go to Python as text: a script's key may be any bytes.
    local v = { name = clip(name, SHORT), value = short(value, 1), type = kind, reference = 0,
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
    end
    if start > 0 then return out end  -- a later page of items: the named keys came first
    local keys, seen = {}, {}
    local is_ctx = lazy_ctx[t]
    for k, v in next, t do
      local item = type(k) == "number" and k >= 1 and k <= n and k == m_floor(k)
      -- ctx's built-ins are its methods, not its data.
      if not item and not (is_ctx and type(v) == "function") then
        keys[#keys + 1], seen[k] = k, true
      end
    end
    -- ctx's fields not read yet are shown as the script would read them, not built on it.
    local read = rawget
    if is_ctx then
      read = ctx_module.peek
      for _, name in pairs(ctx_module.lazy_names) do
        if not seen[name] then keys[#keys + 1] = name end
      end
    end
    -- Sorted by their text, made raw: a key's __tostring is the script's code.
    local names = {}
    for _, k in pairs(keys) do
      names[k] = type(k) == "string" and clip(k, SHORT) or "[" .. short(k, 0) .. "]"
    end
    t_sort(keys, function(a, b) return names[a] < names[b] end)
    for i = 1, (#keys < PAGE and #keys or PAGE) do
      out[#out + 1] = variable(names[keys[i]], read(t, keys[i]))
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
        local locals, upvalues = locals_at(level), upvalues_of(info.func)
        upvalues._ENV = nil  -- Lua 5.4's environment: the Globals scope shows it
        local scope = merged(upvalues, locals)
        frames[#frames + 1] = {
          id = #frames + 1,
          name = info.func == schedule_fn and "schedule" or (info.name and clip(info.name, SHORT))
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
      local tree, err = expression.compile(b)
      if not tree then return { kind = "error", message = clip(err, 512) } end
      local ok, value = expression.run(tree, lookup_in(frame.scope))
      if not ok then return { kind = "error", message = clip(value, 512) } end
      return { kind = "evaluated", variable = variable(clip(b, SHORT), value) }
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
      -- Nothing raised here may reach the script: a failed wait (the channel is gone)
      -- detaches, a failed command answers an error.
      local ok, name, a, b, c = pcall(wait, event)
      if not ok then name = "detach" end
      if name == "resume" then
        step_mode = a ~= "continue" and a or nil
        -- As the hook will see it: this function is one frame deeper than the hook.
        step_depth = stack_depth() - 1
        return
      elseif name == "detach" then
        step_mode, breakpoints = nil, {}
        return
      else
        local done, reply
        if name == "breakpoints" then done, reply = pcall(set_breakpoints, a, b)
        else done, reply = pcall(answer, name, a, b, c) end
        event = done and reply or { kind = "error", message = "the command failed" }
      end
    end
  end

  local function condition_holds(condition, level)
    local ok, value = expression.run(condition.tree, lookup_in(scope_at(level + 1)))
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
        local tree, err = expression.compile(condition)
        if tree then
          set[line] = { tree = tree }
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
    if event ~= "line" then  -- LuaJIT only: a return
      note_return()
      return
    end
    if line > last_line then return end  -- past the script's end: trusted code
    if resume_line ~= nil then
      local info = getinfo(2, "S")
      if info.source == source and reported_again(line, info.linedefined) then return end
    end
    local bp = breakpoints[line]
    if bp == nil and step_mode == nil and not at_entry then return end
    local info = getinfo(2, "S")
    if info.source ~= source then return end
    current_line, current_defined = line, info.linedefined
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
  -- `clock_fn`: seconds, from runtime.py, for Lua 5.4 (LuaJIT has its own, D.monotonic).
  -- os.clock reads the process's CPU clock, which in a hardened worker may move in
  -- steps of milliseconds: too coarse for a line.
  local function set_mode(new_mode, chunkname, lines_in_source, steps_bound, calls_bound,
                          wait_fn, clock_fn)
    mode, source, last_line = new_mode, chunkname, lines_in_source or 0
    max_steps, max_calls = steps_bound or max_steps, calls_bound or max_calls
    wait, clock = wait_fn, D.monotonic or clock_fn
    if new_mode == nil then  -- whatever a failed call left: no hook, B on ctx, the JIT on
      sethook()
      use_builtins(nil)
      ctx_module.set_field_builder(nil)
      inside, active = false, false
      breakpoints, step_mode = {}, nil
      if D.jit_on then D.jit_on() end
    end
  end

  -- host.load: the script's environment, for the debugger's Globals and evaluate.
  local function set_globals(env) globals = env end

  -- host.lua, before ctx is built and `schedule` runs.
  local function start(schedule)
    if mode == nil then return end
    reset_record()
    use_builtins(wrapped)
    ctx_module.set_field_builder(quietly)
    inside, active = false, true
    -- Called once, by the runtime; counted here because a script's `return f(x)` is
    -- a tail call, whose return the hook never sees as schedule's.
    local defined = getinfo(schedule, "S").linedefined
    function_names[defined], function_calls[defined] = "schedule", 1
    schedule_defined, schedule_fn = defined, schedule
    if mode == "debug" then
      hook, hook_mask = debug_hook, repeats_after_calls and "lr" or "l"
      at_entry, step_mode = true, nil
    elseif mode == "profile" then
      hook, hook_mask = trace_hook, "lr"  -- returns too, for the calls per function
    else
      hook, hook_mask = trace_hook, repeats_after_calls and "lr" or "l"
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
    active = false
    local now = clock()
    if last_index ~= nil then self_time[last_index] = self_time[last_index] + (now - last_clock) end
    use_builtins(nil)
    ctx_module.set_field_builder(nil)
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
