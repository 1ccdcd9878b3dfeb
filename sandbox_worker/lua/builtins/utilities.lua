-- Built-ins of runtime-spec section 4.8: logs, metrics, time, math and strings.
return function(P, B, lib, add_log, add_metric, on_now)
  local type, error = P.type, P.error
  local s_find, s_sub, s_format, m_huge = P.s_find, P.s_sub, P.s_format, P.m_huge
  local want = lib.want

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  function B.log_debug(...) add_log("debug", ...) end
  function B.log_info(...) add_log("info", ...) end
  function B.log_warn(...) add_log("warn", ...) end
  function B.log_error(...) add_log("error", ...) end

  function B.emit_metric(name, value)
    want("emit_metric", 1, name, "string")
    want("emit_metric", 2, value, "number")
    if #name > 128 or not s_find(name, "^[%a_:][%w_:]*$") then
      error("ctx.emit_metric: metric name must match [a-zA-Z_:][a-zA-Z0-9_:]* (at most 128 characters), got '"
        .. s_sub(name, 1, 64) .. "'", 2)
    end
    if value ~= value or value == m_huge or value == -m_huge then
      error("ctx.emit_metric: value must be a finite number", 2)
    end
    add_metric(name, value)
  end

  function B.now() return now_ms end

  -- Never negative: a time after the context's own (another host's clock) is 0 ms ago.
  function B.elapsed_since(timestamp_ms)
    want("elapsed_since", 1, timestamp_ms, "number")
    if timestamp_ms > now_ms then return 0 end
    return now_ms - timestamp_ms
  end

  local function numbers(fname, values)
    want(fname, 1, values, "table")
    local n = #values
    for i = 1, n do
      if type(values[i]) ~= "number" then
        error(s_format("ctx.%s: element %d must be a number, got %s", fname, i, type(values[i])), 3)
      end
    end
    return n
  end

  function B.average(values)
    local n = numbers("average", values)
    if n == 0 then return nil end
    local sum = 0
    for i = 1, n do sum = sum + values[i] end
    return sum / n
  end

  function B.max(values)
    local n = numbers("max", values)
    local best = values[1]
    for i = 2, n do if values[i] > best then best = values[i] end end
    return best
  end

  function B.min(values)
    local n = numbers("min", values)
    local best = values[1]
    for i = 2, n do if values[i] < best then best = values[i] end end
    return best
  end

  function B.string_contains(s, sub)
    want("string_contains", 1, s, "string")
    want("string_contains", 2, sub, "string")
    return s_find(s, sub, 1, true) ~= nil
  end

  function B.string_starts_with(s, prefix)
    want("string_starts_with", 1, s, "string")
    want("string_starts_with", 2, prefix, "string")
    return s_sub(s, 1, #prefix) == prefix
  end
end
