-- Read-only job records.
--
-- The queue is the part of ctx that grows with the cluster, so jobs are not copied
-- per call: each is a persistent, empty proxy whose metatable (hidden behind
-- __metatable) reads from a master record. Writes raise. env.lua's wrappers for
-- pairs, next, rawget, rawset and the table library make proxies behave like the
-- plain tables they stand for, without ever handing out the master.
--
-- master_of (proxy -> master) is created here and never replaced; it is written only
-- here. context.lua and env.lua read it.
return function(P, on_now)
  local next, rawget, setmetatable = P.next, P.rawget, P.setmetatable
  local tostring, error, empty = P.tostring, P.error, P.empty

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  local master_of = {}  -- proxy -> master; entries go when the job leaves the queue

  local function readonly_error(_, key)
    error("ctx is read-only: cannot set field '" .. tostring(key) .. "' of a queued job", 2)
  end

  -- wait_time_ms is derived from now_ms when read, so a job that has not changed
  -- never needs to be touched between cycles.
  local job_master_mt = {
    __index = function(master, key)
      if key == "wait_time_ms" then return now_ms - rawget(master, "queued_at") end
      return nil
    end,
  }

  local function proxy_next(proxy, key)
    local master = master_of[proxy]
    if key == "wait_time_ms" then return nil end
    local k, v = next(master, key)
    if k == nil then return "wait_time_ms", now_ms - master.queued_at end
    return k, v
  end

  local function proxy_pairs(proxy) return proxy_next, proxy, nil end

  -- One metatable for every proxy: a per-job metatable would add a table per job
  -- for the collector to walk on every cycle.
  local proxy_mt = {
    __index = function(proxy, key)
      local master = master_of[proxy]
      if master then return master[key] end
      return nil
    end,
    __newindex = readonly_error,
    __metatable = "ctx is read-only",
    __pairs = proxy_pairs,
  }

  local function make_job_proxy(master)
    setmetatable(master, job_master_mt)
    local proxy = setmetatable({}, proxy_mt)
    master_of[proxy] = master
    return proxy
  end

  -- A job that changed keeps its proxy (a script may hold it): point it at the new master.
  local function repoint(proxy, master) master_of[proxy] = master end

  -- A job that left the queue: its proxy reads from no master any more.
  local function release(proxy) master_of[proxy] = nil end

  local function release_all() empty(master_of) end

  return {
    master_of = master_of, job_master_mt = job_master_mt, make_job_proxy = make_job_proxy,
    repoint = repoint, release = release, release_all = release_all,
    proxy_next = proxy_next, readonly_error = readonly_error,
  }
end
