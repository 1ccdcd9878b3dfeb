-- The per-call copies. Jobs are the shared read-only proxies; everything else a script
-- sees is a copy made for this call, so whatever it does to ctx is gone by the next.
-- Copies are made on demand (ctx.pools, ctx.catalog and ctx.tenants on first use,
-- single records when a built-in returns them) and remembered for the call, so the
-- same master always yields the same table: ctx.find_ready_worker(m) is one of the
-- tables in ctx.pools[i].workers. Built-ins read the masters, never the copies.
return function(P, data, on_now)
  local ipairs = P.ipairs
  local copy_array, copy_flat = P.copy_array, P.copy_flat
  local pools, pool_ids = data.pools, data.pool_ids

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  local memo = nil  -- master -> copy, for the call in progress

  local function begin() memo = {} end
  local function finish() memo = nil end

  local function gpu_copy(g)
    local c = memo[g]
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
    memo[g] = c
    return c
  end

  local function worker_copy(w)
    local c = memo[w]
    if c then return c end
    c = {
      id = w.id, pool_id = w.pool_id, status = w.status, model_ref = w.model_ref,
      gpu_ids = copy_array(w.gpu_ids), vram_bytes = w.vram_bytes, uri = w.uri,
      current_job_id = w.current_job_id, job_started_at = w.job_started_at,
      jobs_completed = w.jobs_completed, avg_tokens_per_sec = w.avg_tokens_per_sec,
      uptime_ms = now_ms - w.started_at_ms, started_at_ms = w.started_at_ms,
      last_used_at_ms = w.last_used_at_ms, slots_total = w.slots_total,
      slots_busy = w.slots_busy, active_job_ids = copy_array(w.active_job_ids), api = w.api,
    }
    memo[w] = c
    return c
  end

  local function pool_copy(master)
    local c = memo[master]
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
    memo[master] = c
    return c
  end

  local function model_copy(m)
    local c = memo[m]
    if c then return c end
    c = copy_flat(m)
    c.estimated_tokens_per_sec = copy_flat(m.estimated_tokens_per_sec)
    memo[m] = c
    return c
  end

  local function all_pools()
    local out = {}
    for i, pool_id in ipairs(pool_ids) do out[i] = pool_copy(pools[pool_id]) end
    return out
  end

  return {
    begin = begin, finish = finish, gpu_copy = gpu_copy, worker_copy = worker_copy,
    pool_copy = pool_copy, model_copy = model_copy, all_pools = all_pools,
  }
end
