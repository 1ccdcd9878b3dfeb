-- Read-only job records.
--
-- The queue is the part of ctx that grows with the cluster, so jobs are not copied
-- per call: each is a persistent, empty proxy whose metatable (hidden behind
-- __metatable) reads from a master record. Writes raise. env.lua's wrappers for
-- pairs, next, rawget, rawset and the table library make proxies behave like the
-- plain tables they stand for, without ever handing out the master.
--
-- A job of a full snapshot has no master until it is first read: master_of holds its
-- row in the snapshot's columns (a number), and context.lua's builder makes the master
-- then. A resync so costs a proxy per job, not a table of sixteen fields per job.
--
-- master_of (proxy -> master or row) is created here and never replaced; it is
-- written only here. context.lua and env.lua read it (a row is as true as a master).
return function(P, on_now)
  local type, next, rawget, setmetatable = P.type, P.next, P.rawget, P.setmetatable
  local tostring, error, empty = P.tostring, P.error, P.empty

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  local master_of = {}  -- proxy -> master or row; entries go when the job leaves the queue
  local build = nil     -- row -> a new master (context.lua's, set once)

  local function readonly_error(_, key)
    error("ctx is read-only: cannot set field '" .. tostring(key) .. "' of a queued job", 2)
  end

  -- Waited so far, derived from now_ms when read, so a job that has not changed never
  -- needs to be touched between cycles. Never negative: a job queued after the
  -- context's time (clocks of different hosts) has waited 0 ms.
  local function waited(queued_at)
    local ms = now_ms - queued_at
    if ms < 0 then return 0 end
    return ms
  end

  local job_master_mt = {
    __index = function(master, key)
      if key == "wait_time_ms" then return waited(rawget(master, "queued_at")) end
      return nil
    end,
  }

  -- The master of a proxy, built now if the job has only a row so far; nil once the
  -- job left the queue.
  local function master(proxy)
    local m = master_of[proxy]
    if type(m) == "number" then
      m = setmetatable(build(m), job_master_mt)
      master_of[proxy] = m
    end
    return m
  end

  local function proxy_next(proxy, key)
    local m = master(proxy)
    if m == nil or key == "wait_time_ms" then return nil end
    local k, v = next(m, key)
    if k == nil then return "wait_time_ms", waited(m.queued_at) end
    return k, v
  end

  local function proxy_pairs(proxy) return proxy_next, proxy, nil end

  -- One metatable for every proxy: a per-job metatable would add a table per job
  -- for the collector to walk on every cycle.
  local proxy_mt = {
    __index = function(proxy, key)
      local m = master(proxy)
      if m then return m[key] end
      return nil
    end,
    __newindex = readonly_error,
    __metatable = "ctx is read-only",
    __pairs = proxy_pairs,
  }

  -- A master table, or a row of the snapshot's columns.
  local function make_job_proxy(master_or_row)
    if type(master_or_row) == "table" then setmetatable(master_or_row, job_master_mt) end
    local proxy = setmetatable({}, proxy_mt)
    master_of[proxy] = master_or_row
    return proxy
  end

  -- A job that changed keeps its proxy (a script may hold it): point it at the new master.
  local function repoint(proxy, m) master_of[proxy] = setmetatable(m, job_master_mt) end

  -- A job that left the queue: its proxy reads from no master any more.
  local function release(proxy) master_of[proxy] = nil end

  local function release_all() empty(master_of) end

  local function set_builder(fn)
    if build ~= nil then error("sandbox: the job builder is already set") end
    build = fn
  end

  return {
    master_of = master_of, make_job_proxy = make_job_proxy, repoint = repoint,
    release = release, release_all = release_all, set_builder = set_builder,
    proxy_next = proxy_next, readonly_error = readonly_error,
  }
end
