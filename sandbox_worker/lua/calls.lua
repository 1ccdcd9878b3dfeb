-- The record of one call (a load, or one schedule() run): its logs and metrics, the
-- first sandbox violation it attempted, and whether it asked the core for fresh pool
-- state; and the limits logs, metrics and decisions are kept within.
--
-- Only host.lua begins a call and reads the record. The built-ins get the two sinks
-- and refresh_state, env.lua gets flag_violation: nothing else can clear a violation.
return function(P, text)
  local select, s_sub, t_concat = P.select, P.s_sub, P.t_concat
  local safe_tostring = text.safe_tostring

  local limits = {
    max_log_records = 100, max_log_bytes = 16384, max_metrics = 50,
    max_batch_actions = 256, max_string_bytes = 1024,
  }

  local function configure(max_log_records, max_log_bytes, max_metrics, max_batch_actions,
                           max_string_bytes)
    limits.max_log_records = max_log_records
    limits.max_log_bytes = max_log_bytes
    limits.max_metrics = max_metrics
    limits.max_batch_actions = max_batch_actions
    limits.max_string_bytes = max_string_bytes
  end

  local call = nil  -- the call in progress

  local function begin(refresh_available, pool_state_fresh)
    call = {
      logs = {}, log_bytes = 0, logs_dropped = 0, metrics = {}, metrics_dropped = 0,
      violation = nil, refresh_requested = false,
      refresh_available = refresh_available, pool_state_fresh = pool_state_fresh,
    }
    return call
  end

  local function current() return call end

  local function add_log(level, ...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = safe_tostring((select(i, ...))) end
    local message = t_concat(parts, " ")
    if #call.logs >= limits.max_log_records or call.log_bytes >= limits.max_log_bytes then
      call.logs_dropped = call.logs_dropped + 1
      return
    end
    local room = limits.max_log_bytes - call.log_bytes
    if #message > room then message = s_sub(message, 1, room) end
    call.log_bytes = call.log_bytes + #message
    call.logs[#call.logs + 1] = { level, message }
  end

  -- name and value are checked by ctx.emit_metric.
  local function add_metric(name, value)
    if #call.metrics >= limits.max_metrics then
      call.metrics_dropped = call.metrics_dropped + 1
      return
    end
    call.metrics[#call.metrics + 1] = { name, value }
  end

  -- For ctx.refresh_pool_state: true when this call has fresh pool state, false when
  -- none can be had, nil once the core has been asked for it (the call is then
  -- abandoned, and the core calls again with fresh pools).
  local function refresh_state()
    if call.pool_state_fresh then return true end
    if not call.refresh_available then return false end
    call.refresh_requested = true
    return nil
  end

  -- The first violation of a call is kept, even if the script catches the error.
  local function flag_violation(what)
    if call then call.violation = call.violation or what end
  end

  return {
    limits = limits, configure = configure, begin = begin, current = current,
    add_log = add_log, add_metric = add_metric, refresh_state = refresh_state,
    flag_violation = flag_violation,
  }
end
