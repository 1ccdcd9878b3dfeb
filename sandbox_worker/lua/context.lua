-- The masters: what the core has sent, kept between calls. host.lua exposes the
-- functions below to runtime.py; the built-ins and ctx.lua read the tables through
-- `view`.
--
-- Every master table is created here, once, and never replaced: other files hold it,
-- so reset and the clear_* functions empty it in place. The one exception is the
-- queue, which every commit rebuilds: it is read through view.current_queue().
return function(P, proxies)
  local pairs, ipairs, next, setmetatable = P.pairs, P.ipairs, P.next, P.setmetatable
  local s_find, s_sub = P.s_find, P.s_sub
  local t_insert, t_remove, t_sort = P.t_insert, P.t_remove, P.t_sort
  local m_floor = P.m_floor
  local new_table, empty, copy_flat = P.new_table, P.empty, P.copy_flat
  local master_of, job_master_mt = proxies.master_of, proxies.job_master_mt
  local make_job_proxy, repoint, release = proxies.make_job_proxy, proxies.repoint, proxies.release
  local release_all = proxies.release_all

  local PRIORITY_RANK = { interactive = 0, batch = 1 }

  local jobs = {}         -- id -> proxy
  local queue = {}        -- proxies in queue order (replaced by every commit)
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
  -- Prompt prefixes (docs/ARCHITECTURE.md D29). Kept beside the job masters, not in
  -- them: a script sees a job's token and block counts, never its hashes.
  local job_blocks = {}   -- job id -> array of chained block hashes
  local job_session = {}  -- job id -> the worker its session last ran on
  local held = {}         -- worker id -> { [hash] = true }: what it is believed to hold
  local prefix = { block_tokens = 512 }
  local n_job_blocks, n_held = 0, 0  -- for the memory cap (counts)

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

  local function reset()
    empty(jobs)
    queue, pending, in_pending, moved = {}, {}, {}, {}
    release_all()
    empty(pools); empty(pool_ids); empty(worker_pool)
    empty(models); empty(model_list); empty(aliases); empty(base_refs)
    empty(tenants); empty(tenant_ids); empty(metrics); empty(config)
    empty(job_blocks); empty(job_session); empty(held)
    n_job_blocks, n_held = 0, 0
  end

  local function forget_blocks(id)
    local old = job_blocks[id]
    if old then n_job_blocks = n_job_blocks - #old end
    job_blocks[id], job_session[id] = nil, nil
  end

  -- n jobs as columns (Lua arrays); "" and -1 stand for unset values. Job i's block
  -- hashes are block_flat[offset + 1 .. offset + block_counts[i]]. The four prefix
  -- columns are nil when nothing in them is set.
  local function put_jobs(n, ids, tenant_col, session_col, priorities, model_refs, hashes,
                          max_tokens, seeds, temperatures, created, queued, retries, vram, duration,
                          prompt_tokens, block_counts, block_flat, session_workers)
    local offset = 0
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
        prompt_tokens = prompt_tokens and prompt_tokens[i] or 0,
        prompt_blocks = block_counts and block_counts[i] or 0,
      }, job_master_mt)
      forget_blocks(id)
      local count = block_counts and block_counts[i] or 0
      if count > 0 then
        local list = new_table(count, 0)
        for j = 1, count do list[j] = block_flat[offset + j] end
        job_blocks[id] = list
        n_job_blocks = n_job_blocks + count
      end
      offset = offset + count
      local session_worker = session_workers and session_workers[i] or ""
      if session_worker ~= "" then job_session[id] = session_worker end
      local proxy = jobs[id]
      if proxy then  -- keep the proxy (a script may hold it), point it at the new master
        repoint(proxy, master)
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

  local function remove_jobs(n, ids)
    for i = 1, n do
      local proxy = jobs[ids[i]]
      forget_blocks(ids[i])
      if proxy then
        jobs[ids[i]] = nil
        release(proxy)
        moved[proxy] = true
      end
    end
  end

  -- Merge what changed into the queue: the unchanged jobs are copied once, and each
  -- changed one finds its place by binary search.
  local function commit()
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

  local function put_pool(id, endpoint, status, last_heartbeat_ms, cached_models, ram_total,
                          ram_available, cpu_percent, cpu_count)
    local pool = ensure_pool(id)
    local cached = {}
    for i = 1, #cached_models do cached[i] = cached_models[i] end
    pool.info = { id = id, endpoint = endpoint, status = status,
                  last_heartbeat_ms = last_heartbeat_ms, cached_models = cached,
                  host_ram_total_bytes = ram_total, host_ram_available_bytes = ram_available,
                  host_cpu_percent = cpu_percent, host_cpu_count = cpu_count }
  end

  local function remove_pool(id)
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
  local function put_gpus(n, pool_col, ids, names, capabilities, totals, allocated, free,
                          utilization, temperature, power, fp16, int8, tensor_cores, measured)
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

  local function remove_gpu(pool_id, id)
    local pool = pools[pool_id]
    if pool then remove_by(pool.gpus, function(g) return g.id == id end) end
  end

  local function remove_worker(id)
    local pool_id = worker_pool[id]
    if not pool_id then return end
    remove_by(pools[pool_id].workers, function(w) return w.id == id end)
    worker_pool[id] = nil
  end

  -- gpu_ids of worker i are gpu_flat[offset + 1 .. offset + gpu_counts[i]], and its
  -- active_job_ids likewise in active_flat; "" and -1 stand for an unset
  -- current_job_id and job_started_at.
  local function put_workers(n, pool_col, ids, statuses, model_refs, gpu_counts, gpu_flat, vram,
                             uris, current_jobs, started_jobs, completed, tps, started, last_used,
                             slots_total, slots_busy, active_counts, active_flat, apis)
    local offset, active_offset = 0, 0
    for i = 1, n do
      local pool_id, id = pool_col[i], ids[i]
      remove_worker(id)
      local pool = ensure_pool(pool_id)
      local gpus = {}
      for j = 1, gpu_counts[i] do gpus[j] = gpu_flat[offset + j] end
      offset = offset + gpu_counts[i]
      local active = {}
      for j = 1, active_counts[i] do active[j] = active_flat[active_offset + j] end
      active_offset = active_offset + active_counts[i]
      local current, job_started = current_jobs[i], started_jobs[i]
      if current == "" then current = nil end
      if job_started < 0 then job_started = nil end
      insert_sorted(pool.workers, {
        id = id, pool_id = pool_id, status = statuses[i], model_ref = model_refs[i],
        gpu_ids = gpus, vram_bytes = vram[i], uri = uris[i], current_job_id = current,
        job_started_at = job_started, jobs_completed = completed[i], avg_tokens_per_sec = tps[i],
        started_at_ms = started[i], last_used_at_ms = last_used[i],
        slots_total = slots_total[i], slots_busy = slots_busy[i], active_job_ids = active,
        api = apis[i],
      }, by_id)
      worker_pool[id] = pool_id
    end
  end

  local function clear_catalog()
    empty(models); empty(model_list); empty(aliases); empty(base_refs)
  end

  local function put_model(ref, family, size, quantization, vram_required, context_length,
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

  local function put_alias(name, target) aliases[name] = target end

  local function clear_tenants()
    empty(tenants); empty(tenant_ids)
  end

  local function put_tenant(id, name, quota_vram, quota_jobs, quota_tokens, vram_used, concurrent,
                            tokens_used, reset_at, exceeded)
    if not tenants[id] then insert_sorted(tenant_ids, id, string_less) end
    tenants[id] = {
      id = id, name = name, quota_vram_bytes = quota_vram, quota_max_concurrent_jobs = quota_jobs,
      quota_tokens_daily = quota_tokens, vram_used_bytes = vram_used, concurrent_jobs = concurrent,
      tokens_used_today = tokens_used, quota_reset_at = reset_at, quota_exceeded = exceeded,
    }
  end

  -- Flat tables of scalars (metrics, and each section of config) arrive as key/value lists.
  local function set_metrics(values)
    empty(metrics)
    for k, v in pairs(values) do metrics[k] = v end
  end

  local function set_config(values, queue_cfg, timeout_cfg, retry_cfg, eviction_cfg)
    empty(config)
    for k, v in pairs(values) do config[k] = v end
    config.queue = copy_flat(queue_cfg)
    config.timeout = copy_flat(timeout_cfg)
    config.retry = copy_flat(retry_cfg)
    config.eviction = copy_flat(eviction_cfg)
  end

  -- Blocks a worker is believed to hold, added or removed: worker i's are
  -- flat[offset + 1 .. offset + counts[i]].
  local function put_blocks(n, worker_ids, block_counts, flat, add)
    local offset = 0
    for i = 1, n do
      local id = worker_ids[i]
      local set = held[id]
      if set == nil and add then set = {}; held[id] = set end
      if set ~= nil then
        for j = offset + 1, offset + block_counts[i] do
          local h = flat[j]
          if add and not set[h] then
            set[h] = true; n_held = n_held + 1
          elseif not add and set[h] then
            set[h] = nil; n_held = n_held - 1
          end
        end
        if not add and next(set) == nil then held[id] = nil end
      end
      offset = offset + block_counts[i]
    end
  end

  local function set_block_tokens(n)
    if n > 0 then prefix.block_tokens = n end
  end

  -- The records the worker holds, for its memory cap; running jobs are the ids in
  -- the workers' active_job_ids (up to every slot of every worker).
  local function counts()
    local n_workers, n_gpus, n_running = 0, 0, 0
    for _, id in ipairs(pool_ids) do
      local workers = pools[id].workers
      n_workers = n_workers + #workers
      n_gpus = n_gpus + #pools[id].gpus
      for _, w in ipairs(workers) do n_running = n_running + #w.active_job_ids end
    end
    return #queue, n_workers, n_gpus, #model_list, #tenant_ids, n_running, n_job_blocks + n_held
  end

  return {
    reset = reset, put_jobs = put_jobs, remove_jobs = remove_jobs, commit = commit,
    put_pool = put_pool, remove_pool = remove_pool, put_gpus = put_gpus,
    remove_gpu = remove_gpu, remove_worker = remove_worker, put_workers = put_workers,
    clear_catalog = clear_catalog, put_model = put_model, put_alias = put_alias,
    clear_tenants = clear_tenants, put_tenant = put_tenant, set_metrics = set_metrics,
    set_config = set_config, counts = counts, put_blocks = put_blocks,
    set_block_tokens = set_block_tokens,
    -- What the built-ins and ctx.lua read. They never write to these tables.
    view = {
      jobs = jobs, pools = pools, pool_ids = pool_ids, worker_pool = worker_pool,
      models = models, model_list = model_list, aliases = aliases, base_refs = base_refs,
      tenants = tenants, tenant_ids = tenant_ids, metrics = metrics, config = config,
      job_blocks = job_blocks, job_session = job_session, held = held, prefix = prefix,
      current_queue = function() return queue end,
    },
  }
end
