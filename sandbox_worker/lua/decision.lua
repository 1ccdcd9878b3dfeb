-- Reading the decision: raw access only, every field checked. What schedule() returns
-- is hostile (docs/ARCHITECTURE.md, D6): no metamethod of it ever runs here, strings
-- are bounded and must be UTF-8, numbers must be finite integers, a batch is bounded
-- and one inside it reads as empty. Returns read_decision, which raises
-- { invalid_decision = message }.
return function(P, text, limits)
  local type, rawget, error = P.type, P.rawget, P.error
  local s_format, s_sub = P.s_format, P.s_sub
  local m_floor, m_huge = P.m_floor, P.m_huge
  local utf8_valid, safe_tostring = text.utf8_valid, text.safe_tostring

  local ACTIONS = "dispatch, wait, start_worker, evict_worker or batch"

  local function bad(message) error({ invalid_decision = message }, 0) end

  local function field_string(t, key, where, required)
    local v = rawget(t, key)
    if v == nil then
      if required then bad(where .. ": missing '" .. key .. "'") end
      return ""
    end
    if type(v) ~= "string" then bad(where .. ": '" .. key .. "' must be a string, got " .. type(v)) end
    if #v > limits.max_string_bytes then
      bad(s_format("%s: '%s' is %d bytes, the limit is %d", where, key, #v, limits.max_string_bytes))
    end
    if not utf8_valid(v) then bad(where .. ": '" .. key .. "' is not valid UTF-8") end
    return v
  end

  local function field_integer(t, key, where, required)
    local v = rawget(t, key)
    if v == nil then
      if required then bad(where .. ": missing '" .. key .. "'") end
      return nil
    end
    if type(v) ~= "number" or v ~= v or v == m_huge or v == -m_huge or m_floor(v) ~= v then
      bad(where .. ": '" .. key .. "' must be an integer, got " .. safe_tostring(v))
    end
    return v
  end

  -- One action as a flat record { kind, a, b, c, reason, rule } for the host.
  local function read_action(t, where, allow_batch)
    if type(t) ~= "table" then bad(where .. ": expected a table, got " .. type(t)) end
    local action = rawget(t, "action")
    if action == nil then bad(where .. ": missing 'action' (one of " .. ACTIONS .. ")") end
    if type(action) ~= "string" then bad(where .. ": 'action' must be a string, got " .. type(action)) end
    local reason = field_string(t, "reason", where, false)
    local rule = field_string(t, "rule", where, false)
    if action == "dispatch" then
      return { "dispatch", field_string(t, "job_id", where, true),
               field_string(t, "worker_id", where, true), nil, reason, rule }
    elseif action == "wait" then
      return { "wait", field_integer(t, "retry_after_ms", where, false), nil, nil, reason, rule }
    elseif action == "start_worker" then
      local src = t
      -- Older spec: { action = "start_worker", start_worker = { model_ref, pool_id, gpu_id } }.
      local nested = rawget(t, "start_worker")
      if rawget(t, "model_ref") == nil and type(nested) == "table" then src = nested end
      return { "start_worker", field_string(src, "pool_id", where, true),
               field_integer(src, "gpu_id", where, true), field_string(src, "model_ref", where, true),
               reason, rule }
    elseif action == "evict_worker" or action == "evict" then
      -- Older spec: { action = "evict", evict_worker_id = ... }.
      local key = rawget(t, "worker_id") == nil and rawget(t, "evict_worker_id") ~= nil
        and "evict_worker_id" or "worker_id"
      return { "evict_worker", field_string(t, key, where, true), nil, nil, reason, rule }
    elseif action == "batch" then
      if not allow_batch then return { "batch", {}, nil, nil, reason, rule } end
      local list = rawget(t, "actions")
      if type(list) ~= "table" then bad(where .. ": 'actions' must be a list of actions") end
      local out = {}
      local i = 1
      while true do
        local item = rawget(list, i)
        if item == nil then break end
        if i > limits.max_batch_actions then
          bad(s_format("%s: more than %d actions", where, limits.max_batch_actions))
        end
        out[i] = read_action(item, where .. ".actions[" .. i .. "]", false)
        i = i + 1
      end
      return { "batch", out, nil, nil, reason, rule }
    end
    bad(where .. ": unknown action '" .. s_sub(action, 1, 64) .. "' (expected " .. ACTIONS .. ")")
  end

  local function read_decision(result)
    if result == nil then
      bad("schedule() returned nil; return a decision such as { action = \"wait\" }")
    end
    return read_action(result, "decision", true)
  end

  return read_decision
end
