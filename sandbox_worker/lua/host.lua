-- The host table that sandbox_worker/runtime.py drives: the context updates (from
-- context.lua), and loading and running the scheduler, with every error captured.
-- Nothing in here hands a Python object to user code: ctx holds plain Lua tables.
return function(P, text, calls, context, ctx, env, read_decision, platform, set_now, instrument)
  local type, rawget, xpcall, pcall = P.type, P.rawget, P.xpcall, P.pcall
  local s_find, s_sub, traceback = P.s_find, P.s_sub, P.traceback
  local safe_tostring, utf8_clean = text.safe_tostring, text.utf8_clean
  local begin_call, current_call = calls.begin, calls.current
  local build_ctx, finish_ctx = ctx.build, ctx.finish
  local make_env, compile = env.make_env, env.compile
  local set_platform_source, set_platform_schedule = platform.set_source, platform.set_schedule

  local host = {
    configure = calls.configure,
    reset = context.reset, put_jobs = context.put_jobs,
    put_snapshot_jobs = context.put_snapshot_jobs, remove_jobs = context.remove_jobs,
    commit = context.commit, queue_merges = context.queue_merges, put_pool = context.put_pool,
    remove_pool = context.remove_pool, put_gpus = context.put_gpus, remove_gpu = context.remove_gpu,
    remove_worker = context.remove_worker, put_workers = context.put_workers,
    clear_catalog = context.clear_catalog, put_model = context.put_model,
    put_alias = context.put_alias, clear_tenants = context.clear_tenants,
    put_tenant = context.put_tenant, set_metrics = context.set_metrics,
    set_config = context.set_config, set_now = set_now, counts = context.counts,
    set_block_tokens = context.set_block_tokens, put_blocks = context.put_blocks,
    is_luajit = P.IS_LUAJIT,
    -- Diagnostics workers only (runtime.py): trace, profile, debug.
    set_instrument = instrument.set_mode, instrument_record = instrument.record,
  }

  local user_env = nil

  local function error_text(err)
    return safe_tostring(err)
  end

  -- The traceback of a script error, without the trusted frames that called it: the
  -- text is cut where xpcall (in run or host.load below) appears.
  local function capture(err)
    local message = error_text(err)
    local tb = traceback(message, 2)
    local cut = s_find(tb, "\n%s*%[C%]: in function '?<?xpcall")
    if cut then tb = s_sub(tb, 1, cut - 1) end
    return { message = message, traceback = utf8_clean(tb) }
  end

  -- Returns ok, message, traceback.
  function host.load(source, chunkname, platform_src, expose_source)
    local call = begin_call(false, false)
    set_platform_source(platform_src, expose_source)

    local platform_env = make_env("info")
    local pchunk, perr = compile(platform_src, "=platform.lua", platform_env)
    if not pchunk then return false, "platform scheduler: " .. error_text(perr), "" end
    local pok, pfail = xpcall(pchunk, capture)
    if not pok then return false, "platform scheduler: " .. pfail.message, pfail.traceback end
    local pschedule = rawget(platform_env, "schedule")
    if type(pschedule) ~= "function" then
      return false, "platform scheduler: does not define schedule(ctx)", ""
    end
    set_platform_schedule(pschedule)

    user_env = make_env("info")
    instrument.set_globals(user_env)
    -- The older spec's global: `return platform.schedule(context)`.
    -- (Through ctx's current built-ins: traced like ctx.platform_schedule when traced.)
    user_env.platform = { schedule = function(c) return ctx.builtin("platform_schedule")(c) end }
    local chunk, err = compile(source, chunkname, user_env)
    if not chunk then return false, error_text(err), "" end
    local ok, fail = xpcall(chunk, capture)
    if not ok then return false, fail.message, fail.traceback end
    if call.violation then
      return false, "sandbox violation while loading: " .. call.violation, ""
    end
    if type(rawget(user_env, "schedule")) ~= "function" then
      return false, "the scheduler does not define a global function schedule(ctx)", ""
    end
    return true, nil, nil
  end

  -- Runs schedule(ctx) once. Returns status, payload, traceback, where status is
  -- "ok" (payload: decision record), "error", "invalid", "violation", "memory" or "refresh".
  local function run(refresh_available, pool_state_fresh)
    local call = begin_call(refresh_available, pool_state_fresh)
    local schedule = user_env and rawget(user_env, "schedule")
    if type(schedule) ~= "function" then return "error", "no scheduler is loaded", "" end
    instrument.start(schedule)  -- nothing unless a diagnostics worker asked
    local c = build_ctx()
    local ok, result = xpcall(schedule, capture, c)
    instrument.finish()
    if call.refresh_requested then return "refresh", nil, nil end
    if call.violation then
      if not ok and type(result) == "table" and s_find(result.message, "sandbox", 1, true) then
        return "violation", result.message, result.traceback
      end
      return "violation", call.violation .. " is disabled in the scheduler sandbox "
        .. "(the error was caught by the script, the attempt still counts)", ""
    end
    if not ok then
      if type(result) ~= "table" then  -- errors in the handler itself: memory, mostly
        local message = error_text(result)
        if s_find(message, "not enough memory", 1, true) then return "memory", message, "" end
        return "error", message, ""
      end
      if s_find(result.message, "not enough memory", 1, true) then
        return "memory", result.message, result.traceback
      end
      return "error", result.message, result.traceback
    end
    local rok, record = pcall(read_decision, result)
    if not rok then
      if type(record) == "table" and record.invalid_decision then
        return "invalid", record.invalid_decision, ""
      end
      return "invalid", "could not read the decision: " .. error_text(record), ""
    end
    return "ok", record, nil
  end

  function host.run(refresh_available, pool_state_fresh)
    local status, payload, tb = run(refresh_available, pool_state_fresh)
    finish_ctx()
    local call = current_call()
    return status, payload, tb, call.logs, call.logs_dropped, call.metrics, call.metrics_dropped
  end

  return host
end
