-- The trusted half of the sandbox: runs with the real globals, before any user code,
-- and returns the `host` table that sandbox_worker/runtime.py drives.
--
-- It keeps the context the core has sent (the "masters"), builds a fresh `ctx` for
-- every schedule() call, implements the ctx built-ins (lua-runtime-spec section 4),
-- builds the allowlisted environment user code runs in (section 6 plus DESIGN.md's
-- additions), and reads the returned decision with raw access only.
--
-- Nothing in here hands a Python object to user code: ctx holds plain Lua tables.

-- Capture everything we use before user code exists, so that no later change to a
-- global can reach trusted code.
local type, pairs, ipairs, next, select = type, pairs, ipairs, next, select
local rawget, rawset, rawequal = rawget, rawset, rawequal
local rawlen = rawlen or function(t) return #t end
local setmetatable, getmetatable = setmetatable, getmetatable
local tostring, tonumber, error, pcall, xpcall = tostring, tonumber, error, pcall, xpcall
local string, table, math, os, coroutine = string, table, math, os, coroutine
local s_find, s_sub, s_format, s_gsub, s_byte = string.find, string.sub, string.format, string.gsub, string.byte
local s_match = string.match
local t_insert, t_remove, t_sort, t_concat = table.insert, table.remove, table.sort, table.concat
local t_unpack = table.unpack or unpack
local m_floor, m_huge = math.floor, math.huge
local traceback = debug.traceback
local load = load
local collectgarbage = collectgarbage
local LUA_VERSION = _VERSION
local IS_LUAJIT = type(jit) == "table"
local utf8_lib = utf8
local bit_lib = bit

local new_table, clear_table
do
  local ok, tnew = pcall(require, "table.new")
  new_table = ok and tnew or function() return {} end
  local cok, tclear = pcall(require, "table.clear")
  clear_table = cok and tclear or nil
end

local host = {}

-- Scripts share the string metatable with trusted code: hide it, so that
-- getmetatable("").__index cannot be replaced.
getmetatable("").__metatable = false

-------------------------------------------------------------------------------
-- Limits and per-call state
-------------------------------------------------------------------------------
local limits = {
  max_log_records = 100, max_log_bytes = 16384, max_metrics = 50,
  max_batch_actions = 256, max_string_bytes = 1024,
}

local call = nil          -- per-call scratch: logs, metrics, violation, refresh flags
local now_ms = 0

function host.configure(max_log_records, max_log_bytes, max_metrics, max_batch_actions, max_string_bytes)
  limits.max_log_records = max_log_records
  limits.max_log_bytes = max_log_bytes
  limits.max_metrics = max_metrics
  limits.max_batch_actions = max_batch_actions
  limits.max_string_bytes = max_string_bytes
end

-------------------------------------------------------------------------------
-- Read-only job records
--
-- The queue is the part of ctx that grows with the cluster, so jobs are not copied
-- per call: each is a persistent, empty proxy whose metatable (hidden behind
-- __metatable) reads from a master record. Writes raise. The wrappers for pairs,
-- next, rawget, rawset and the table library below make proxies behave like the
-- plain tables they stand for, without ever handing out the master.
-------------------------------------------------------------------------------
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

-------------------------------------------------------------------------------
-- The masters: what the core has sent, kept between calls
-------------------------------------------------------------------------------
local PRIORITY_RANK = { interactive = 0, batch = 1 }

local jobs = {}         -- id -> proxy
local queue = {}        -- proxies in queue order
local pools = {}        -- id -> { info = {...}, gpus = {sorted}, workers = {sorted} }
local pool_ids = {}     -- sorted
local worker_pool = {}  -- worker id -> pool id
local models = {}       -- model_ref -> master
local model_list = {}   -- sorted refs
local aliases = {}
local base_refs = {}    -- "ref" without "::file=..." -> full ref, or false when ambiguous
local tenants = {}      -- id -> master
local tenant_ids = {}
local metrics = {}
local config = {}
local rr_last = {}      -- model_ref -> worker id last picked by find_worker_round_robin

local function job_before(a, b)
  local ra = PRIORITY_RANK[a.priority] or 2
  local rb = PRIORITY_RANK[b.priority] or 2
  if ra ~= rb then return ra < rb end
  if a.queued_at ~= b.queued_at then return a.queued_at < b.queued_at end
  return a.id < b.id
end

local function proxy_before(a, b) return job_before(master_of[a], master_of[b]) end

-- Changes to the queue are collected and merged in one pass per update, so that an
-- update costs what changed plus one linear merge, never a shift per job.
local pending = {}         -- proxies added or re-ordered since the last commit
local in_pending = {}      -- proxy -> true
local moved = {}           -- proxy -> true: drop from its old place at commit

function host.reset()
  jobs, queue, pending, in_pending, moved, master_of = {}, {}, {}, {}, {}, {}
  pools, pool_ids, worker_pool = {}, {}, {}
  models, model_list, aliases, base_refs = {}, {}, {}, {}
  tenants, tenant_ids, metrics, config = {}, {}, {}, {}
end

-- n jobs as columns (Lua arrays); "" and -1 stand for unset values.
function host.put_jobs(n, ids, tenant_col, session_col, priorities, model_refs, hashes,
                       max_tokens, seeds, temperatures, created, queued, retries, vram, duration)
  for i = 1, n do
    local id = ids[i]
    local tenant, session, seed = tenant_col[i], session_col[i], seeds[i]
    if tenant == "" then tenant = nil end
    if session == "" then session = nil end
    if seed < 0 then seed = nil end
    local master = setmetatable({
      id = id, tenant_id = tenant, session_id = session, priority = priorities[i],
      model_ref = model_refs[i], prompt_hash = hashes[i], max_tokens = max_tokens[i],
      seed = seed, temperature = temperatures[i], created_at = created[i],
      queued_at = queued[i], retry_count = retries[i], estimated_vram_bytes = vram[i],
      estimated_duration_ms = duration[i],
    }, job_master_mt)
    local proxy = jobs[id]
    if proxy then  -- keep the proxy (a script may hold it), point it at the new master
      master_of[proxy] = master
      moved[proxy] = true
    else
      proxy = make_job_proxy(master)
      jobs[id] = proxy
    end
    if not in_pending[proxy] then
      in_pending[proxy] = true
      pending[#pending + 1] = proxy
    end
  end
end

function host.remove_jobs(n, ids)
  for i = 1, n do
    local proxy = jobs[ids[i]]
    if proxy then
      jobs[ids[i]] = nil
      master_of[proxy] = nil
      moved[proxy] = true
    end
  end
end

-- Merge what changed into the queue: the unchanged jobs are copied once, and each
-- changed one finds its place by binary search.
function host.commit()
  if #pending == 0 and next(moved) == nil then return end
  local kept, n = queue, #queue
  if next(moved) ~= nil then
    kept, n = new_table(#queue, 0), 0
    for i = 1, #queue do
      local p = queue[i]
      if not moved[p] then n = n + 1; kept[n] = p end
    end
  end
  local added, m = {}, 0
  for i = 1, #pending do
    local p = pending[i]
    if master_of[p] ~= nil then m = m + 1; added[m] = p end  -- not removed since
  end
  for i = 2, m do  -- full snapshots arrive in order: sort only when they do not
    if proxy_before(added[i], added[i - 1]) then t_sort(added, proxy_before) break end
  end
  if n == 0 then
    queue = added
  else
    local merged, k, from = new_table(n + m, 0), 0, 1
    for j = 1, m do
      local a = master_of[added[j]]
      local lo, hi = from, n + 1
      while lo < hi do
        local mid = m_floor((lo + hi) / 2)
        if job_before(master_of[kept[mid]], a) then lo = mid + 1 else hi = mid end
      end
      for i = from, lo - 1 do k = k + 1; merged[k] = kept[i] end
      k = k + 1; merged[k] = added[j]
      from = lo
    end
    for i = from, n do k = k + 1; merged[k] = kept[i] end
    queue = merged
  end
  pending, in_pending, moved = {}, {}, {}
end

local function insert_sorted(list, item, before)
  local i = #list + 1
  while i > 1 and before(item, list[i - 1]) do i = i - 1 end
  t_insert(list, i, item)
end

local function by_id(a, b) return a.id < b.id end
local function string_less(a, b) return a < b end

local function ensure_pool(id)
  local pool = pools[id]
  if not pool then
    pool = { info = { id = id, endpoint = "", status = "offline", last_heartbeat_ms = 0,
                      cached_models = {}, host_ram_total_bytes = 0, host_ram_available_bytes = 0,
                      host_cpu_percent = 0, host_cpu_count = 0 }, gpus = {}, workers = {} }
    pools[id] = pool
    insert_sorted(pool_ids, id, string_less)
  end
  return pool
end

function host.put_pool(id, endpoint, status, last_heartbeat_ms, cached_models, ram_total,
                       ram_available, cpu_percent, cpu_count)
  local pool = ensure_pool(id)
  local cached = {}
  for i = 1, #cached_models do cached[i] = cached_models[i] end
  pool.info = { id = id, endpoint = endpoint, status = status,
                last_heartbeat_ms = last_heartbeat_ms, cached_models = cached,
                host_ram_total_bytes = ram_total, host_ram_available_bytes = ram_available,
                host_cpu_percent = cpu_percent, host_cpu_count = cpu_count }
end

function host.remove_pool(id)
  local pool = pools[id]
  if not pool then return end
  for _, w in ipairs(pool.workers) do worker_pool[w.id] = nil end
  pools[id] = nil
  for i = 1, #pool_ids do if pool_ids[i] == id then t_remove(pool_ids, i) break end end
end

local function remove_by(list, pred)
  for i = 1, #list do
    if pred(list[i]) then return t_remove(list, i) end
  end
end

-- GPUs and workers arrive as columns too (one call per update, not per record).
function host.put_gpus(n, pool_col, ids, names, capabilities, totals, allocated, free, utilization,
                       temperature, power, fp16, int8, tensor_cores, measured)
  for i = 1, n do
    local pool_id, id = pool_col[i], ids[i]
    local pool = ensure_pool(pool_id)
    remove_by(pool.gpus, function(g) return g.id == id end)
    insert_sorted(pool.gpus, {
      id = id, pool_id = pool_id, device_name = names[i], compute_capability = capabilities[i],
      vram_total_bytes = totals[i], vram_allocated_bytes = allocated[i],
      vram_free_bytes = free[i], utilization_percent = utilization[i],
      temperature_celsius = temperature[i], power_draw_watts = power[i],
      supports_fp16 = fp16[i], supports_int8 = int8[i], supports_tensor_cores = tensor_cores[i],
      measured = measured[i],
    }, by_id)
  end
end

function host.remove_gpu(pool_id, id)
  local pool = pools[pool_id]
  if pool then remove_by(pool.gpus, function(g) return g.id == id end) end
end

function host.remove_worker(id)
  local pool_id = worker_pool[id]
  if not pool_id then return end
  remove_by(pools[pool_id].workers, function(w) return w.id == id end)
  worker_pool[id] = nil
end

-- gpu_ids of worker i are gpu_flat[offset + 1 .. offset + gpu_counts[i]];
-- "" and -1 stand for an unset current_job_id and job_started_at.
function host.put_workers(n, pool_col, ids, statuses, model_refs, gpu_counts, gpu_flat, vram,
                          uris, current_jobs, started_jobs, completed, tps, started, last_used)
  local offset = 0
  for i = 1, n do
    local pool_id, id = pool_col[i], ids[i]
    host.remove_worker(id)
    local pool = ensure_pool(pool_id)
    local gpus = {}
    for j = 1, gpu_counts[i] do gpus[j] = gpu_flat[offset + j] end
    offset = offset + gpu_counts[i]
    local current, job_started = current_jobs[i], started_jobs[i]
    if current == "" then current = nil end
    if job_started < 0 then job_started = nil end
    insert_sorted(pool.workers, {
      id = id, pool_id = pool_id, status = statuses[i], model_ref = model_refs[i],
      gpu_ids = gpus, vram_bytes = vram[i], uri = uris[i], current_job_id = current,
      job_started_at = job_started, jobs_completed = completed[i], avg_tokens_per_sec = tps[i],
      started_at_ms = started[i], last_used_at_ms = last_used[i],
    }, by_id)
    worker_pool[id] = pool_id
  end
end

function host.clear_catalog()
  models, model_list, aliases, base_refs = {}, {}, {}, {}
end

function host.put_model(ref, family, size, quantization, vram_required, context_length,
                        determinism, streaming, tokens_per_sec, file_size, file_hash, min_cc)
  local tps = {}
  for k, v in pairs(tokens_per_sec) do tps[k] = v end
  models[ref] = {
    model_ref = ref, family = family, size = size, quantization = quantization,
    vram_required_bytes = vram_required, context_length = context_length,
    supports_determinism = determinism, supports_streaming = streaming,
    estimated_tokens_per_sec = tps, file_size_bytes = file_size, file_hash = file_hash,
    min_compute_capability = min_cc,
  }
  insert_sorted(model_list, ref, string_less)
  local cut = s_find(ref, "::", 1, true)
  if cut then
    local base = s_sub(ref, 1, cut - 1)
    if base_refs[base] == nil then base_refs[base] = ref else base_refs[base] = false end
  end
end

function host.put_alias(name, target) aliases[name] = target end

function host.clear_tenants() tenants, tenant_ids = {}, {} end

function host.put_tenant(id, name, quota_vram, quota_jobs, quota_tokens, vram_used, concurrent,
                         tokens_used, reset_at, exceeded)
  if not tenants[id] then insert_sorted(tenant_ids, id, string_less) end
  tenants[id] = {
    id = id, name = name, quota_vram_bytes = quota_vram, quota_max_concurrent_jobs = quota_jobs,
    quota_tokens_daily = quota_tokens, vram_used_bytes = vram_used, concurrent_jobs = concurrent,
    tokens_used_today = tokens_used, quota_reset_at = reset_at, quota_exceeded = exceeded,
  }
end

-- Flat tables of scalars (metrics, and each section of config) arrive as key/value lists.
local function copy_flat(source)
  local out = {}
  for k, v in pairs(source) do out[k] = v end
  return out
end

function host.set_metrics(values) metrics = copy_flat(values) end

function host.set_config(values, queue_cfg, timeout_cfg, retry_cfg, eviction_cfg)
  config = copy_flat(values)
  config.queue = copy_flat(queue_cfg)
  config.timeout = copy_flat(timeout_cfg)
  config.retry = copy_flat(retry_cfg)
  config.eviction = copy_flat(eviction_cfg)
end

function host.set_now(ms) now_ms = ms end

function host.counts()
  local n_workers, n_gpus = 0, 0
  for _, id in ipairs(pool_ids) do
    n_workers = n_workers + #pools[id].workers
    n_gpus = n_gpus + #pools[id].gpus
  end
  return #queue, n_workers, n_gpus, #model_list, #tenant_ids
end

-------------------------------------------------------------------------------
-- The per-call ctx. Jobs are the shared read-only proxies; everything else a script
-- sees is a copy made for this call, so whatever it does to ctx is gone by the next.
-- Copies are made on demand (ctx.pools, ctx.catalog and ctx.tenants on first use,
-- single records when a built-in returns them) and remembered for the call, so the
-- same master always yields the same table: ctx.find_ready_worker(m) is one of the
-- tables in ctx.pools[i].workers. Built-ins read the masters, never the copies.
-------------------------------------------------------------------------------
local cur = nil  -- the call in progress: { memo = {master -> copy}, ... }

local function copy_array(source)
  local n = #source
  local out = new_table(n, 0)
  for i = 1, n do out[i] = source[i] end
  return out
end

local function gpu_copy(g)
  local c = cur.memo[g]
  if c then return c end
  c = {
    id = g.id, pool_id = g.pool_id, device_name = g.device_name,
    compute_capability = g.compute_capability, vram_total_bytes = g.vram_total_bytes,
    vram_allocated_bytes = g.vram_allocated_bytes, vram_free_bytes = g.vram_free_bytes,
    utilization_percent = g.utilization_percent, temperature_celsius = g.temperature_celsius,
    power_draw_watts = g.power_draw_watts, supports_fp16 = g.supports_fp16,
    supports_int8 = g.supports_int8, supports_tensor_cores = g.supports_tensor_cores,
    measured = g.measured,
  }
  cur.memo[g] = c
  return c
end

local function worker_copy(w)
  local c = cur.memo[w]
  if c then return c end
  c = {
    id = w.id, pool_id = w.pool_id, status = w.status, model_ref = w.model_ref,
    gpu_ids = copy_array(w.gpu_ids), vram_bytes = w.vram_bytes, uri = w.uri,
    current_job_id = w.current_job_id, job_started_at = w.job_started_at,
    jobs_completed = w.jobs_completed, avg_tokens_per_sec = w.avg_tokens_per_sec,
    uptime_ms = now_ms - w.started_at_ms, started_at_ms = w.started_at_ms,
    last_used_at_ms = w.last_used_at_ms,
  }
  cur.memo[w] = c
  return c
end

local function pool_copy(master)
  local c = cur.memo[master]
  if c then return c end
  local info = master.info
  local gpus, workers = {}, {}
  for i, g in ipairs(master.gpus) do gpus[i] = gpu_copy(g) end
  for i, w in ipairs(master.workers) do workers[i] = worker_copy(w) end
  c = {
    id = info.id, endpoint = info.endpoint, status = info.status,
    last_heartbeat_ms = info.last_heartbeat_ms, heartbeat_age_ms = now_ms - info.last_heartbeat_ms,
    gpus = gpus, workers = workers, cached_models = copy_array(info.cached_models),
    host_ram_total_bytes = info.host_ram_total_bytes or 0,
    host_ram_available_bytes = info.host_ram_available_bytes or 0,
    host_cpu_percent = info.host_cpu_percent or 0, host_cpu_count = info.host_cpu_count or 0,
  }
  cur.memo[master] = c
  return c
end

local function model_copy(m)
  local c = cur.memo[m]
  if c then return c end
  c = copy_flat(m)
  c.estimated_tokens_per_sec = copy_flat(m.estimated_tokens_per_sec)
  cur.memo[m] = c
  return c
end

local function all_pools()
  local out = {}
  for i, pool_id in ipairs(pool_ids) do out[i] = pool_copy(pools[pool_id]) end
  return out
end

local helpers_table  -- defined with the built-ins below

-- The ctx fields that are built when first read.
local LAZY = {
  pools = all_pools,
  helpers = function() return helpers_table() end,
  catalog = function()
    local out = {}
    for _, ref in ipairs(model_list) do out[ref] = model_copy(models[ref]) end
    return { models = out, aliases = copy_flat(aliases) }
  end,
  tenants = function()
    local out = {}
    for _, id in ipairs(tenant_ids) do out[id] = copy_flat(tenants[id]) end
    return out
  end,
}

local lazy_ctx = setmetatable({}, { __mode = "k" })
local ctx_mt = {
  __index = function(ctx, key)
    local make = LAZY[key]
    if make == nil then return nil end
    local value = make()
    rawset(ctx, key, value)
    return value
  end,
  __metatable = "ctx",
}

-- Build every lazy field of a ctx (before pairs/next walk it).
local function materialize(ctx)
  for key in pairs(LAZY) do local _ = ctx[key] end
end

-------------------------------------------------------------------------------
-- Built-ins (lua-runtime-spec section 4)
-------------------------------------------------------------------------------
local B = {}

local function arg_error(fname, index, expected, value)
  error(s_format("ctx.%s: argument #%d must be %s, got %s", fname, index, expected, type(value)), 3)
end

local function want(fname, index, value, expected)
  if type(value) ~= expected then arg_error(fname, index, "a " .. expected, value) end
end

local function want_opt(fname, index, value, expected)
  if value ~= nil and type(value) ~= expected then
    arg_error(fname, index, "a " .. expected .. " or nil", value)
  end
end

-- Must stay identical to Catalog.resolve in orchestrator/model.py.
local function resolve(model)
  local target = aliases[model]
  if target then return target end
  if models[model] then return model end
  local base = base_refs[model]
  if base then return base end
  return model
end

local function tokens_per_sec(model, device_name)
  local tps = model.estimated_tokens_per_sec
  local exact = tps[device_name]
  if exact then return exact end
  -- NVML reports "NVIDIA A100-SXM4-80GB" where catalogs say "NVIDIA A100".
  local best, best_len = nil, 0
  for name, value in pairs(tps) do
    if name ~= "default" and #name > best_len and s_sub(device_name, 1, #name) == name then
      best, best_len = value, #name
    end
  end
  return best or tps.default or 0
end

local function online(pool) return pool ~= nil and pool.info.status ~= "offline" end

-- The master GPUs a worker (master or copy) runs on.
local function worker_gpus(worker)
  local pool = pools[worker_pool[worker.id] or ""]
  local out = {}
  if not pool then return out end
  for _, gpu_id in ipairs(worker.gpu_ids) do
    for _, g in ipairs(pool.gpus) do
      if g.id == gpu_id then out[#out + 1] = g end
    end
  end
  return out
end

-- Ready master workers that serve `model_ref`, in pool then id order.
local function ready_workers(model_ref, pool_id)
  local want_ref = resolve(model_ref)
  local out = {}
  for _, id in ipairs(pool_ids) do
    local pool = pools[id]
    if online(pool) and (pool_id == nil or id == pool_id) then
      for _, w in ipairs(pool.workers) do
        if w.status == "ready" and resolve(w.model_ref) == want_ref then out[#out + 1] = w end
      end
    end
  end
  return out
end

local function worker_load(worker)
  local gpus = worker_gpus(worker)
  if #gpus == 0 then return 0 end
  local sum = 0
  for _, g in ipairs(gpus) do sum = sum + g.utilization_percent end
  return sum / #gpus
end

local function worker_vram_free(worker)
  local sum = 0
  for _, g in ipairs(worker_gpus(worker)) do sum = sum + g.vram_free_bytes end
  return sum
end

-- The candidate with the smallest key (ties broken by worker id), as a copy.
local function pick_min(candidates, key)
  local best, best_key = nil, nil
  for _, w in ipairs(candidates) do
    local k = key(w)
    if best == nil or k < best_key or (k == best_key and w.id < best.id) then best, best_key = w, k end
  end
  return best and worker_copy(best)
end

local function each_worker(fn)
  for _, id in ipairs(pool_ids) do
    for _, w in ipairs(pools[id].workers) do fn(w) end
  end
end

-- 3.1 queue -------------------------------------------------------------------
function B.get_job(job_id)
  want("get_job", 1, job_id, "string")
  return jobs[job_id]
end

function B.filter_jobs(criteria)
  local out = {}
  if type(criteria) == "function" then
    for _, job in ipairs(queue) do if criteria(job) then out[#out + 1] = job end end
  elseif type(criteria) == "table" then
    for _, job in ipairs(queue) do
      local match = true
      for k, v in pairs(criteria) do
        if job[k] ~= v then match = false break end
      end
      if match then out[#out + 1] = job end
    end
  else
    arg_error("filter_jobs", 1, "a table of field values or a predicate function", criteria)
  end
  return out
end

-- 3.2 / 4.2 pools ---------------------------------------------------------------
function B.get_pool(pool_id)
  want("get_pool", 1, pool_id, "string")
  local pool = pools[pool_id]
  return pool and pool_copy(pool)
end

function B.filter_pools(predicate)
  want("filter_pools", 1, predicate, "function")
  local out = {}
  for _, pool in ipairs(all_pools()) do if predicate(pool) then out[#out + 1] = pool end end
  return out
end

function B.get_all_workers()
  local out = {}
  each_worker(function(w) out[#out + 1] = worker_copy(w) end)
  return out
end

function B.find_workers_by_model(model_ref)
  want("find_workers_by_model", 1, model_ref, "string")
  local want_ref = resolve(model_ref)
  local out = {}
  each_worker(function(w)
    if resolve(w.model_ref) == want_ref then out[#out + 1] = worker_copy(w) end
  end)
  return out
end

function B.refresh_pool_state()
  if call.pool_state_fresh then return true end
  if not call.refresh_available then return false end
  -- Ask the core for fresh state: abandon this call; the core calls again with
  -- fresh pools, and then this returns true. Swallowing the error changes nothing.
  call.refresh_requested = true
  error("ctx.refresh_pool_state: fetching fresh pool state", 2)
end

function B.find_pools_with_capacity(vram_needed)
  want("find_pools_with_capacity", 1, vram_needed, "number")
  local out = {}
  for _, id in ipairs(pool_ids) do
    local pool = pools[id]
    if online(pool) then
      for _, g in ipairs(pool.gpus) do
        if g.vram_free_bytes >= vram_needed then out[#out + 1] = pool_copy(pool) break end
      end
    end
  end
  return out
end

function B.is_pool_healthy(pool_id)
  want("is_pool_healthy", 1, pool_id, "string")
  local pool = pools[pool_id]
  return pool ~= nil and pool.info.status == "healthy"
end

local function vram_totals(pool)
  local total, allocated = 0, 0
  for _, g in ipairs(pool.gpus) do
    total = total + g.vram_total_bytes
    allocated = allocated + g.vram_allocated_bytes
  end
  return total, allocated
end

function B.get_pool_utilization(pool_id)
  want("get_pool_utilization", 1, pool_id, "string")
  local pool = pools[pool_id]
  if not pool then return 0 end
  local total, allocated = vram_totals(pool)
  if total == 0 then return 0 end
  return allocated / total
end

-- 4.1 worker selection ----------------------------------------------------------
function B.find_least_loaded_worker(model_ref, pool_id)
  want("find_least_loaded_worker", 1, model_ref, "string")
  want_opt("find_least_loaded_worker", 2, pool_id, "string")
  return pick_min(ready_workers(model_ref, pool_id), worker_load)
end

function B.find_most_vram_free_worker(model_ref)
  want("find_most_vram_free_worker", 1, model_ref, "string")
  return pick_min(ready_workers(model_ref), function(w) return -worker_vram_free(w) end)
end

function B.find_ready_worker(model_ref)
  want("find_ready_worker", 1, model_ref, "string")
  local w = ready_workers(model_ref)[1]
  return w and worker_copy(w)
end

function B.find_worker_round_robin(model_ref)
  want("find_worker_round_robin", 1, model_ref, "string")
  local candidates = ready_workers(model_ref)
  if #candidates == 0 then return nil end
  t_sort(candidates, by_id)
  local key = resolve(model_ref)
  local last = rr_last[key]
  local chosen = candidates[1]
  if last then
    for _, w in ipairs(candidates) do
      if w.id > last then chosen = w break end
    end
  end
  rr_last[key] = chosen.id
  return worker_copy(chosen)
end

function B.filter_workers(predicate)
  want("filter_workers", 1, predicate, "function")
  local out = {}
  each_worker(function(w)
    local copy = worker_copy(w)
    if predicate(copy) then out[#out + 1] = copy end
  end)
  return out
end

-- 4.3 GPUs ----------------------------------------------------------------------
function B.find_gpus_with_vram(vram_needed)
  want("find_gpus_with_vram", 1, vram_needed, "number")
  local out = {}
  for _, id in ipairs(pool_ids) do
    local pool = pools[id]
    if online(pool) then
      for _, g in ipairs(pool.gpus) do
        if g.vram_free_bytes >= vram_needed then out[#out + 1] = gpu_copy(g) end
      end
    end
  end
  return out
end

function B.get_gpu(pool_id, gpu_id)
  want("get_gpu", 1, pool_id, "string")
  want("get_gpu", 2, gpu_id, "number")
  local pool = pools[pool_id]
  if not pool then return nil end
  for _, g in ipairs(pool.gpus) do if g.id == gpu_id then return gpu_copy(g) end end
  return nil
end

local function version_at_least(actual, required)
  if required == nil or required == "" then return true end
  local a1, a2 = s_match(actual or "", "^(%d+)%.?(%d*)$")
  local r1, r2 = s_match(required, "^(%d+)%.?(%d*)$")
  if not a1 or not r1 then return false end
  a1, a2, r1, r2 = tonumber(a1), tonumber(a2) or 0, tonumber(r1), tonumber(r2) or 0
  return a1 > r1 or (a1 == r1 and a2 >= r2)
end

-- Must agree with check_gpu_compatibility in orchestrator/validation.py.
function B.check_gpu_compatibility(gpu, model_ref)
  want("check_gpu_compatibility", 1, gpu, "table")
  want("check_gpu_compatibility", 2, model_ref, "string")
  local model = models[resolve(model_ref)]
  if not model then return false, "unknown_model" end
  if gpu.vram_total_bytes < model.vram_required_bytes then return false, "insufficient_vram" end
  if not version_at_least(gpu.compute_capability, model.min_compute_capability) then
    return false, "compute_capability_too_low"
  end
  return true, nil
end

function B.estimate_performance(model_ref, gpu)
  want("estimate_performance", 1, model_ref, "string")
  want("estimate_performance", 2, gpu, "table")
  local model = models[resolve(model_ref)]
  if not model then return 0 end
  return tokens_per_sec(model, gpu.device_name or "")
end

-- 3.3 / 4.4 catalog -------------------------------------------------------------
function B.resolve_model(model)
  want("resolve_model", 1, model, "string")
  return resolve(model)
end

function B.get_model(model_ref)
  want("get_model", 1, model_ref, "string")
  local model = models[resolve(model_ref)]
  return model and model_copy(model)
end

function B.model_exists(model_ref)
  want("model_exists", 1, model_ref, "string")
  return models[resolve(model_ref)] ~= nil
end

function B.filter_models(predicate)
  want("filter_models", 1, predicate, "function")
  local out = {}
  for _, ref in ipairs(model_list) do
    local model = model_copy(models[ref])
    if predicate(model) then out[#out + 1] = model end
  end
  return out
end

function B.find_models_by_family(family)
  want("find_models_by_family", 1, family, "string")
  local out = {}
  for _, ref in ipairs(model_list) do
    if models[ref].family == family then out[#out + 1] = model_copy(models[ref]) end
  end
  return out
end

function B.get_model_vram(model_ref)
  want("get_model_vram", 1, model_ref, "string")
  local model = models[resolve(model_ref)]
  return model and model.vram_required_bytes or nil
end

-- 4.5 jobs ----------------------------------------------------------------------
function B.calculate_wait_time(job)
  want("calculate_wait_time", 1, job, "table")
  return now_ms - job.queued_at
end

function B.estimate_job_duration(job, worker)
  want("estimate_job_duration", 1, job, "table")
  want_opt("estimate_job_duration", 2, worker, "table")
  if worker then
    local tps = worker.avg_tokens_per_sec or 0
    if tps <= 0 then
      local model = models[resolve(job.model_ref)]
      local gpu = worker_gpus(worker)[1]
      if model and gpu then tps = tokens_per_sec(model, gpu.device_name) end
    end
    if tps > 0 then return math.ceil(job.max_tokens / tps * 1000) end
  end
  return job.estimated_duration_ms
end

-- Must agree with check_job_fit in orchestrator/validation.py.
function B.can_job_fit(job, worker)
  want("can_job_fit", 1, job, "table")
  if worker == nil then return false, "no_worker" end
  want("can_job_fit", 2, worker, "table")
  local pool = pools[worker_pool[worker.id] or ""]
  if pool and pool.info.status == "offline" then return false, "pool_offline" end
  if worker.status ~= "ready" then return false, "worker_not_ready" end
  if resolve(worker.model_ref) ~= resolve(job.model_ref) then return false, "model_mismatch" end
  if (worker.vram_bytes or 0) < (job.estimated_vram_bytes or 0) then
    return false, "insufficient_vram"
  end
  return true, nil
end

local PRIORITY_BASE = { interactive = 1000, batch = 100 }

function B.get_job_priority_score(job)
  want("get_job_priority_score", 1, job, "table")
  -- Priority class first; within it, one point per second waited (aging).
  return (PRIORITY_BASE[job.priority] or 0) + (now_ms - job.queued_at) / 1000
end

-- 3.4 / 4.6 quotas --------------------------------------------------------------
-- Must agree with check_tenant_quota in orchestrator/validation.py. The third
-- value says which quota: "flagged", "concurrent_jobs", "vram" or "tokens_daily".
function B.check_tenant_quota(tenant_id, job)
  want("check_tenant_quota", 2, job, "table")
  if tenant_id == nil then return true, nil end  -- home/lab mode: no tenants
  want("check_tenant_quota", 1, tenant_id, "string")
  local t = tenants[tenant_id]
  if not t then
    -- As the validator: outside platform mode, a tenant nobody configured has no quota.
    if config.deployment_mode == "platform" or config.mode == "platform" then
      return false, "unknown_tenant"
    end
    return true, nil
  end
  if t.quota_exceeded then return false, "quota_exceeded", "flagged" end
  if t.quota_max_concurrent_jobs and t.concurrent_jobs + 1 > t.quota_max_concurrent_jobs then
    return false, "quota_exceeded", "concurrent_jobs"
  end
  if t.quota_vram_bytes and t.vram_used_bytes + (job.estimated_vram_bytes or 0) > t.quota_vram_bytes then
    return false, "quota_exceeded", "vram"
  end
  if t.quota_tokens_daily and t.tokens_used_today + (job.max_tokens or 0) > t.quota_tokens_daily then
    return false, "quota_exceeded", "tokens_daily"
  end
  return true, nil
end

function B.get_tenant_usage(tenant_id)
  want("get_tenant_usage", 1, tenant_id, "string")
  local t = tenants[tenant_id]
  if not t then return nil end
  return {
    tenant_id = t.id, vram_used_bytes = t.vram_used_bytes, concurrent_jobs = t.concurrent_jobs,
    tokens_used_today = t.tokens_used_today, quota_vram_bytes = t.quota_vram_bytes,
    quota_max_concurrent_jobs = t.quota_max_concurrent_jobs,
    quota_tokens_daily = t.quota_tokens_daily, quota_reset_at = t.quota_reset_at,
    quota_exceeded = t.quota_exceeded,
  }
end

function B.estimate_quota_impact(tenant_id, job)
  want_opt("estimate_quota_impact", 1, tenant_id, "string")
  want("estimate_quota_impact", 2, job, "table")
  return job.estimated_vram_bytes or 0
end

-- 4.7 eviction ------------------------------------------------------------------
-- Only idle workers are candidates: evicting a busy one would kill its job.
local function idle_workers(pool_id)
  local out = {}
  for _, id in ipairs(pool_ids) do
    if pool_id == nil or id == pool_id then
      for _, w in ipairs(pools[id].workers) do
        if (w.status == "ready" or w.status == "failed") and w.current_job_id == nil then
          out[#out + 1] = w
        end
      end
    end
  end
  return out
end

local function lru_key(w) return w.last_used_at_ms * 1e-3 end

function B.find_worker_to_evict_lru(pool_id)
  want_opt("find_worker_to_evict_lru", 1, pool_id, "string")
  return pick_min(idle_workers(pool_id), lru_key)
end

function B.find_worker_to_evict_lfu(pool_id)
  want_opt("find_worker_to_evict_lfu", 1, pool_id, "string")
  -- Jobs per hour of uptime; the least used goes first.
  return pick_min(idle_workers(pool_id), function(w)
    local hours = math.max(now_ms - w.started_at_ms, 1) / 3600000
    return w.jobs_completed / hours
  end)
end

-- Returns needed, and how many bytes of VRAM are allocated beyond the threshold.
function B.should_evict(pool_id)
  want("should_evict", 1, pool_id, "string")
  local pool = pools[pool_id]
  if not pool then return false, 0 end
  local total, allocated = vram_totals(pool)
  local threshold = (config.eviction and config.eviction.vram_threshold) or 0.9
  local over = allocated - m_floor(threshold * total)
  if total > 0 and allocated / total > threshold then return true, over end
  return false, 0
end

function B.find_model_to_evict(pool_id)
  want("find_model_to_evict", 1, pool_id, "string")
  local pool = pools[pool_id]
  if not pool then return nil end
  local served = {}
  for _, w in ipairs(pool.workers) do served[resolve(w.model_ref)] = true end
  for _, ref in ipairs(pool.info.cached_models) do  -- least recently used first
    if not served[resolve(ref)] then return ref end
  end
  return nil
end

-- 4.8 utilities -----------------------------------------------------------------
-- Text leaving the sandbox must be UTF-8 (the host decodes it strictly).
local function utf8_seq_len(s, i)
  local c = s_byte(s, i)
  if c < 0x80 then return 1 end
  local len
  if c >= 0xC2 and c <= 0xDF then len = 2
  elseif c >= 0xE0 and c <= 0xEF then len = 3
  elseif c >= 0xF0 and c <= 0xF4 then len = 4
  else return nil end
  for j = i + 1, i + len - 1 do
    local cc = s_byte(s, j)
    if cc == nil or cc < 0x80 or cc > 0xBF then return nil end
  end
  local c2 = s_byte(s, i + 1)  -- overlong forms, surrogates, beyond U+10FFFF
  if (c == 0xE0 and c2 < 0xA0) or (c == 0xED and c2 > 0x9F)
    or (c == 0xF0 and c2 < 0x90) or (c == 0xF4 and c2 > 0x8F) then
    return nil
  end
  return len
end

local function utf8_valid(s)
  if not s_find(s, "[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    local len = utf8_seq_len(s, i)
    if not len then return false end
    i = i + len
  end
  return true
end

-- Valid sequences are kept, other bytes shown as \xNN.
local function utf8_clean(s)
  if utf8_valid(s) then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local len = utf8_seq_len(s, i)
    if len then
      out[#out + 1] = s_sub(s, i, i + len - 1)
      i = i + len
    else
      out[#out + 1] = s_format("\\x%02x", s_byte(s, i))
      i = i + 1
    end
  end
  return t_concat(out)
end

local function safe_tostring(value)
  local text = value
  if type(value) ~= "string" then
    local ok, result = pcall(tostring, value)
    text = (ok and type(result) == "string") and result or ("<" .. type(value) .. ">")
  end
  return utf8_clean(text)
end

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
  if #call.metrics >= limits.max_metrics then
    call.metrics_dropped = call.metrics_dropped + 1
    return
  end
  call.metrics[#call.metrics + 1] = { name, value }
end

function B.now() return now_ms end

function B.elapsed_since(timestamp_ms)
  want("elapsed_since", 1, timestamp_ms, "number")
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

-- 4.9 platform scheduler (filled in by host.load) ---------------------------------
local platform_schedule = nil
local platform_source = nil
local expose_platform_source = true

function B.platform_schedule(ctx)
  want("platform_schedule", 1, ctx, "table")
  return platform_schedule(ctx)
end

function B.get_platform_scheduler_source()
  if expose_platform_source then return platform_source end
  return nil
end

-- The older spec's names (programmable-scheduler-spec section 4 and 6.2).
B.find_worker_most_vram_free = B.find_most_vram_free_worker

function helpers_table()
  local helpers = {}
  for name, fn in pairs(B) do helpers[name] = fn end
  helpers.find_worker = B.find_least_loaded_worker
  helpers.find_worker_most_vram_free = B.find_most_vram_free_worker
  -- Old signature: by job id.
  helpers.calculate_wait_time = function(job_or_id)
    local job = job_or_id
    if type(job_or_id) == "string" then job = jobs[job_or_id] end
    if job == nil then return nil end
    return now_ms - job.queued_at
  end
  -- Old signature: (tenant_id, vram_needed) -> allowed, reason.
  helpers.check_quota = function(tenant_id, vram_needed)
    return B.check_tenant_quota(tenant_id, { estimated_vram_bytes = vram_needed or 0, max_tokens = 0 })
  end
  return helpers
end

-- ctx.queue is the one per-call copy that grows with the cluster. Where LuaJIT's
-- table.clear exists, the same table is emptied and refilled each call (whatever a
-- script left in it is wiped), which spares the collector 8 bytes per job per call.
local queue_copy = nil

local function fresh_queue()
  if clear_table == nil then return copy_array(queue) end
  if queue_copy == nil then queue_copy = new_table(#queue, 0) else clear_table(queue_copy) end
  for i = 1, #queue do queue_copy[i] = queue[i] end
  return queue_copy
end

local function build_ctx()
  cur = { memo = {} }
  local ctx = setmetatable({
    queue = fresh_queue(), metrics = copy_flat(metrics), config = copy_flat(config),
  }, ctx_mt)
  ctx.metrics.timestamp_ms = now_ms
  for _, section in ipairs({ "queue", "timeout", "retry", "eviction" }) do
    ctx.config[section] = copy_flat(config[section] or {})
  end
  for name, fn in pairs(B) do ctx[name] = fn end
  lazy_ctx[ctx] = true
  return ctx
end

-------------------------------------------------------------------------------
-- The user environment: an allowlist, built fresh for every load.
-------------------------------------------------------------------------------
local function violation(what, why)
  if call then call.violation = call.violation or what end
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

local function compile(source, chunkname, env)
  if type(source) ~= "string" then return nil, "source must be a string" end
  if s_byte(source, 1) == 27 then return nil, "bytecode is not accepted, only Lua source" end
  return load(source, chunkname, "t", env)
end

-------------------------------------------------------------------------------
-- Loading and running
-------------------------------------------------------------------------------
local user_env = nil

local function error_text(err)
  return safe_tostring(err)
end

-- The traceback of a script error, without the trusted frames that called it.
local function capture(err)
  local message = error_text(err)
  local text = traceback(message, 2)
  local cut = s_find(text, "\n%s*%[C%]: in function '?<?xpcall")
  if cut then text = s_sub(text, 1, cut - 1) end
  return { message = message, traceback = utf8_clean(text) }
end

local function fresh_call(refresh_available, pool_state_fresh)
  call = {
    logs = {}, log_bytes = 0, logs_dropped = 0, metrics = {}, metrics_dropped = 0,
    violation = nil, refresh_requested = false,
    refresh_available = refresh_available, pool_state_fresh = pool_state_fresh,
  }
end

-- Returns ok, message, traceback.
function host.load(source, chunkname, platform_src, expose_source)
  fresh_call(false, false)
  platform_source = platform_src
  expose_platform_source = expose_source

  local platform_env = make_env("info")
  local pchunk, perr = compile(platform_src, "=platform.lua", platform_env)
  if not pchunk then return false, "platform scheduler: " .. error_text(perr), "" end
  local pok, pfail = xpcall(pchunk, capture)
  if not pok then return false, "platform scheduler: " .. pfail.message, pfail.traceback end
  local pschedule = rawget(platform_env, "schedule")
  if type(pschedule) ~= "function" then
    return false, "platform scheduler: does not define schedule(ctx)", ""
  end
  platform_schedule = pschedule

  user_env = make_env("info")
  -- The older spec's global: `return platform.schedule(context)`.
  user_env.platform = { schedule = function(ctx) return B.platform_schedule(ctx) end }
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

-------------------------------------------------------------------------------
-- Reading the decision: raw access only, every field checked.
-------------------------------------------------------------------------------
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

-- Runs schedule(ctx) once. Returns status, payload, traceback, where status is
-- "ok" (payload: decision record), "error", "invalid", "violation", "memory" or "refresh".
local function run(refresh_available, pool_state_fresh)
  fresh_call(refresh_available, pool_state_fresh)
  local schedule = user_env and rawget(user_env, "schedule")
  if type(schedule) ~= "function" then return "error", "no scheduler is loaded", "" end
  local ctx = build_ctx()
  local ok, result = xpcall(schedule, capture, ctx)
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
      local text = error_text(result)
      if s_find(text, "not enough memory", 1, true) then return "memory", text, "" end
      return "error", text, ""
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
  cur = nil
  return status, payload, tb, call.logs, call.logs_dropped, call.metrics, call.metrics_dropped
end

host.is_luajit = IS_LUAJIT
return host
