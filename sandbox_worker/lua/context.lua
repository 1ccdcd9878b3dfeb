-- The masters: what the core has sent, kept between calls. host.lua exposes the
-- functions below to runtime.py; the built-ins and ctx.lua read the tables through
-- `view`.
--
-- Every master table is created here, once, and never replaced: other files hold it,
-- so reset and the clear_* functions empty it in place. The one exception is the
-- ordered queue, read through view.current_queue().
--
-- An update costs what changed, not the size of the queue (issue 17): a job goes into
-- `jobs` and a set of pending changes, and the ordered queue is merged only when
-- something first reads it in order during a call (ctx.queue, filter_jobs, the platform
-- scheduler), on that script's account. A full snapshot keeps its job columns as they
-- came, and a job's master is built when the job is first read (proxies.lua).
return function(P, proxies)
  local type, pairs, ipairs, next, error = P.type, P.pairs, P.ipairs, P.next, P.error
  local s_find, s_sub = P.s_find, P.s_sub
  local t_insert, t_remove, t_sort = P.t_insert, P.t_remove, P.t_sort
  local m_floor = P.m_floor
  local new_table, empty, copy_flat = P.new_table, P.empty, P.copy_flat
  local master_of, make_job_proxy = proxies.master_of, proxies.make_job_proxy
  local repoint, release, release_all = proxies.repoint, proxies.release, proxies.release_all

  local PRIORITY_RANK = { interactive = 0, batch = 1 }

  local jobs = {}         -- id -> proxy
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
  -- Kept as records come and go, so that counts() (every call) does not walk them.
  local n_jobs, n_workers, n_gpus, n_running = 0, 0, 0, 0
  local n_job_blocks, n_held = 0, 0

  -- The last full snapshot's job columns, while a job still reads from them: proxies
  -- of its jobs hold their row until first read, and a stale place (below) the row of
  -- a job that changed or left until the next merge. Dropped when neither is left; until
  -- then all its rows count towards the memory cap (counts).
  local snap, snap_at, snap_rows, snap_live = nil, nil, 0, 0

  -- The queue in order, as of the last merge. A queued job is in it, or pending (added
  -- or changed since), or both: a changed job's entry is stale, at its old place. A
  -- stale entry keeps the job's master or row as it was, by whose order the merge
  -- finds it, so that a merge is a copy of the queue, not a lookup per job.
  local queue, n_queue = {}, 0
  -- The array the queue was in before the last merge; the next merge writes into it.
  -- Nothing holds the queue from one call to the next (ctx.queue is a copy), and a
  -- fresh 8-byte-per-job array for every merge costs more than the merge itself.
  local spare, n_spare = {}, 0
  local pending = {}         -- proxy -> true
  local stale = {}           -- proxy -> its old master or row, at its place in queue
  local n_stale = 0
  local merges = 0           -- for tests, through host.queue_merges

  -- `flat` holds the job columns named in `layout`, n values each, one column after
  -- another (runtime.py's _jobs), then every job's block hashes in turn. Returns each
  -- column's offset by name, and the hashes' offset.
  local function offsets(layout, n)
    local at = {}
    for k = 1, #layout do at[layout[k]] = (k - 1) * n end
    return at, #layout * n
  end

  -- Job r's master. A column that was not sent holds its unset value everywhere: ""
  -- for strings, 0 for the prompt's tokens and blocks.
  local function job_record(flat, at, r)
    local tenant = at.tenant_id and flat[at.tenant_id + r] or ""
    local session = at.session_id and flat[at.session_id + r] or ""
    local seed = flat[at.seed + r]
    if tenant == "" then tenant = nil end
    if session == "" then session = nil end
    if seed < 0 then seed = nil end
    return {
      id = flat[at.id + r], tenant_id = tenant, session_id = session,
      priority = flat[at.priority + r], model_ref = flat[at.model_ref + r],
      prompt_hash = at.prompt_hash and flat[at.prompt_hash + r] or "",
      max_tokens = flat[at.max_tokens + r], seed = seed, temperature = flat[at.temperature + r],
      created_at = flat[at.created_at + r], queued_at = flat[at.queued_at + r],
      retry_count = flat[at.retry_count + r],
      estimated_vram_bytes = flat[at.estimated_vram_bytes + r],
      estimated_duration_ms = flat[at.estimated_duration_ms + r],
      prompt_tokens = at.prompt_tokens and flat[at.prompt_tokens + r] or 0,
      prompt_blocks = at.block_counts and flat[at.block_counts + r] or 0,
    }
  end

  -- The columns go once no job reads from them and no stale place may hold a row.
  local function drop_columns_if_unread()
    if snap_live == 0 and n_stale == 0 then snap, snap_at, snap_rows = nil, nil, 0 end
  end

  -- A job no longer reads from the snapshot's columns: it was built, changed or left.
  local function off_columns()
    snap_live = snap_live - 1
    drop_columns_if_unread()
  end

  proxies.set_builder(function(r)
    local master = job_record(snap, snap_at, r)
    off_columns()
    return master
  end)

  -- Queue order: priority class, then queued_at, then id, of a master, a stale entry's
  -- old fields, or a row of the snapshot's columns (read there, without building the
  -- job's master).
  local function order(m)
    if type(m) == "number" then
      return PRIORITY_RANK[snap[snap_at.priority + m]] or 2, snap[snap_at.queued_at + m],
        snap[snap_at.id + m]
    end
    return PRIORITY_RANK[m.priority] or 2, m.queued_at, m.id
  end

  local function before(ra, qa, ia, rb, qb, ib)
    if ra ~= rb then return ra < rb end
    if qa ~= qb then return qa < qb end
    return ia < ib
  end

  -- Jobs as they are now.
  local function proxy_before(a, b)
    local ra, qa, ia = order(master_of[a])
    return before(ra, qa, ia, order(master_of[b]))
  end

  -- The first place in queue[from..n_queue] whose entry does not come before the
  -- order (r, q, id). Entries are ordered by what they were at the last merge.
  local function place_of(from, r, q, id)
    local lo, hi = from, n_queue + 1
    while lo < hi do
      local mid = m_floor((lo + hi) / 2)
      local entry = queue[mid]
      local re, qe, ie = order(stale[entry] or master_of[entry])
      if before(re, qe, ie, r, q, id) then lo = mid + 1 else hi = mid end
    end
    return lo
  end

  -- Merge what changed into the queue: each stale entry and each pending job finds its
  -- place by binary search, and the queue is copied once around them.
  -- O(queue + changes * log(queue)), with no lookup per unchanged job.
  local function merge()
    local gone, g = new_table(n_stale, 0), 0
    for proxy, old in next, stale do
      local at = place_of(1, order(old))
      if queue[at] ~= proxy then error("sandbox: the queue is out of order") end
      g = g + 1; gone[g] = at
    end
    t_sort(gone)
    local added, m = {}, 0
    for proxy in next, pending do m = m + 1; added[m] = proxy end
    if m > 1 then t_sort(added, proxy_before) end
    local merged, k, from, skip = spare, 0, 1, 1
    -- Extended first: a merge can fail part-way in a script's call (its memory cap), and
    -- whatever it wrote is then cleared by the next one.
    if n_queue - g + m > n_spare then n_spare = n_queue - g + m end
    for j = 1, m + 1 do
      local to = n_queue
      if j <= m then to = place_of(from, order(master_of[added[j]])) - 1 end
      for i = from, to do
        if i == gone[skip] then skip = skip + 1 else k = k + 1; merged[k] = queue[i] end
      end
      if j <= m then k = k + 1; merged[k] = added[j] end
      from = to + 1
    end
    for i = k + 1, n_spare do merged[i] = nil end
    spare, n_spare, queue, n_queue = queue, n_queue, merged, k
    pending, stale, n_stale = {}, {}, 0
    merges = merges + 1
    drop_columns_if_unread()
  end

  -- The queue in order, merged first if anything changed since the last merge.
  local function current_queue()
    if n_stale > 0 or next(pending) ~= nil then merge() end
    return queue
  end

  -- After each update. Nothing is merged for the queue's sake, but the places of jobs
  -- that left are not kept forever when no script reads the queue: once they outnumber
  -- the jobs queued, merge. A merge then follows at least as many changes as the queue
  -- holds jobs, so its cost per change stays constant.
  local function commit()
    if n_stale > n_jobs then merge() end
  end

  -- A queued job changes or leaves: if it has a place in the queue, that place is now
  -- stale, and keeps the job's master or row as it was. (A snapshot's jobs are never
  -- pending: they are all in the queue.)
  local function unplace(proxy)
    local m = master_of[proxy]
    if not pending[proxy] then
      stale[proxy] = m
      n_stale = n_stale + 1
    end
    if type(m) == "number" then off_columns() end
  end

  local function reset()
    empty(jobs)
    release_all()
    queue, n_queue, spare, n_spare, pending, stale, n_stale = {}, 0, {}, 0, {}, {}, 0
    snap, snap_at, snap_rows, snap_live = nil, nil, 0, 0
    empty(pools); empty(pool_ids); empty(worker_pool)
    empty(models); empty(model_list); empty(aliases); empty(base_refs)
    empty(tenants); empty(tenant_ids); empty(metrics); empty(config)
    empty(job_blocks); empty(job_session); empty(held)
    n_jobs, n_workers, n_gpus, n_running, n_job_blocks, n_held = 0, 0, 0, 0, 0, 0
  end

  local function forget_blocks(id)
    local old = job_blocks[id]
    if old then n_job_blocks = n_job_blocks - #old end
    job_blocks[id], job_session[id] = nil, nil
  end

  -- The prompt blocks and session workers of n jobs: job r's block hashes are
  -- flat[offset + 1 .. offset + its block count], from `hashes_at` on.
  local function put_prefix(n, at, flat, hashes_at)
    local ids, counts, sessions = at.id, at.block_counts, at.session_worker
    local offset = hashes_at
    for r = 1, n do
      local id = flat[ids + r]
      forget_blocks(id)
      if counts then
        local count = flat[counts + r]
        if count > 0 then
          local list = new_table(count, 0)
          for j = 1, count do list[j] = flat[offset + j] end
          job_blocks[id] = list
          n_job_blocks = n_job_blocks + count
        end
        offset = offset + count
      end
      if sessions then
        local worker = flat[sessions + r]
        if worker ~= "" then job_session[id] = worker end
      end
    end
  end

  -- Jobs added or changed (a delta): masters are built now, O(jobs).
  local function put_jobs(n, layout, flat)
    local at, hashes_at = offsets(layout, n)
    local ids = at.id
    for r = 1, n do
      local id = flat[ids + r]
      local master = job_record(flat, at, r)
      local proxy = jobs[id]
      if proxy then  -- keep the proxy (a script may hold it), point it at the new master
        unplace(proxy)
        repoint(proxy, master)
      else
        proxy = make_job_proxy(master)
        jobs[id] = proxy
        n_jobs = n_jobs + 1
      end
      pending[proxy] = true
    end
    put_prefix(n, at, flat, hashes_at)
  end

  -- Whether rows 1..n of the columns are in queue order.
  local function rows_in_order(flat, at, n)
    local pr, qa, ids = at.priority, at.queued_at, at.id
    local r0, q0, i0 = PRIORITY_RANK[flat[pr + 1]] or 2, flat[qa + 1], flat[ids + 1]
    for r = 2, n do
      local r1, q1, i1 = PRIORITY_RANK[flat[pr + r]] or 2, flat[qa + r], flat[ids + r]
      if before(r1, q1, i1, r0, q0, i0) then return false end
      r0, q0, i0 = r1, q1, i1
    end
    return true
  end

  -- The jobs of a full snapshot, right after reset: a proxy each, reading from its row
  -- until first read. They come in queue order; sorted here only when they do not.
  local function put_snapshot_jobs(n, layout, flat)
    if n_jobs > 0 then error("sandbox: a snapshot's jobs go into an empty context") end
    local at, hashes_at = offsets(layout, n)
    snap, snap_at, snap_rows = flat, at, n
    queue = new_table(n, 0)
    local ids, live = at.id, 0
    for r = 1, n do
      local id = flat[ids + r]
      local proxy = jobs[id]
      if proxy then  -- one id twice (the core never sends it): the later row wins
        if type(master_of[proxy]) == "number" then live = live - 1 end
        repoint(proxy, job_record(flat, at, r))
      else
        proxy = make_job_proxy(r)
        jobs[id] = proxy
        n_jobs, live = n_jobs + 1, live + 1
        queue[n_jobs] = proxy
      end
    end
    n_queue, snap_live = n_jobs, live
    if n_jobs < n or not rows_in_order(flat, at, n) then t_sort(queue, proxy_before) end
    drop_columns_if_unread()
    if at.block_counts or at.session_worker then put_prefix(n, at, flat, hashes_at) end
  end

  local function remove_jobs(n, ids)
    for i = 1, n do
      local id = ids[i]
      local proxy = jobs[id]
      forget_blocks(id)
      if proxy then
        unplace(proxy)
        jobs[id], pending[proxy] = nil, nil
        n_jobs = n_jobs - 1
        release(proxy)
      end
    end
  end

  local function insert_sorted(list, item, before)
    local i = #list + 1
    while i > 1 and before(item, list[i - 1]) do i = i - 1 end
    t_insert(list, i, item)
  end

  local function by_id(a, b) return a.id < b.id end
  local function string_less(a, b) return a < b end

  local function index_of(list, id)
    for i = 1, #list do if list[i].id == id then return i end end
    return nil
  end

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
    for _, w in ipairs(pool.workers) do
      worker_pool[w.id] = nil
      n_running = n_running - #w.active_job_ids
    end
    n_workers, n_gpus = n_workers - #pool.workers, n_gpus - #pool.gpus
    pools[id] = nil
    for i = 1, #pool_ids do if pool_ids[i] == id then t_remove(pool_ids, i) break end end
  end

  -- GPUs and workers arrive as one flat array each (runtime.py's _gpus and _workers):
  -- one call per update. Each record costs at most the records of its pool: found by
  -- id, replaced in place or inserted in id order.
  --
  -- n GPUs: their pool ids, then a row of GPU_WIDTH fields each (runtime.py's _gpu_row).
  local GPU_WIDTH = 13

  local function put_gpus(n, flat)
    for i = 1, n do
      local b = n + (i - 1) * GPU_WIDTH
      local pool_id, id = flat[i], flat[b + 1]
      local list = ensure_pool(pool_id).gpus
      local g = {
        id = id, pool_id = pool_id, device_name = flat[b + 2], compute_capability = flat[b + 3],
        vram_total_bytes = flat[b + 4], vram_allocated_bytes = flat[b + 5],
        vram_free_bytes = flat[b + 6], utilization_percent = flat[b + 7],
        temperature_celsius = flat[b + 8], power_draw_watts = flat[b + 9],
        supports_fp16 = flat[b + 10], supports_int8 = flat[b + 11],
        supports_tensor_cores = flat[b + 12], measured = flat[b + 13],
      }
      local at = index_of(list, id)
      if at then
        list[at] = g
      else
        insert_sorted(list, g, by_id)
        n_gpus = n_gpus + 1
      end
    end
  end

  local function remove_gpu(pool_id, id)
    local pool = pools[pool_id]
    local at = pool and index_of(pool.gpus, id)
    if at then
      t_remove(pool.gpus, at)
      n_gpus = n_gpus - 1
    end
  end

  local function remove_worker(id)
    local pool_id = worker_pool[id]
    if not pool_id then return end
    local list = pools[pool_id].workers
    local w = t_remove(list, index_of(list, id))
    worker_pool[id] = nil
    n_workers, n_running = n_workers - 1, n_running - #w.active_job_ids
  end

  -- n workers: their pool ids; a row of WORKER_WIDTH fields each (runtime.py's
  -- _worker_row); their job_started_at (-1 when unset); their numbers of GPU ids and of
  -- active job ids; then every worker's GPU ids in turn, and every worker's active job
  -- ids in turn. An unset current_job_id is ""; a worker from before slots (0 slots, no
  -- API) is the spec's one-slot llama.cpp worker.
  local WORKER_WIDTH = 13

  local function put_workers(n, flat)
    local started, gpu_counts, active_counts = n * (1 + WORKER_WIDTH), n * (2 + WORKER_WIDTH),
      n * (3 + WORKER_WIDTH)
    local gpu_offset = n * (4 + WORKER_WIDTH)
    local active_offset = gpu_offset
    for i = 1, n do active_offset = active_offset + flat[gpu_counts + i] end
    -- Lists empty when this update began (a snapshot's): appended to, sorted once at the end.
    local fresh = {}
    for i = 1, n do
      local b = n + (i - 1) * WORKER_WIDTH
      local pool_id, id = flat[i], flat[b + 1]
      local gpus, n_gpu_ids = {}, flat[gpu_counts + i]
      for j = 1, n_gpu_ids do gpus[j] = flat[gpu_offset + j] end
      gpu_offset = gpu_offset + n_gpu_ids
      local active, n_active = {}, flat[active_counts + i]
      for j = 1, n_active do active[j] = flat[active_offset + j] end
      active_offset = active_offset + n_active
      local current, job_started = flat[b + 6], flat[started + i]
      if current == "" then current = nil end
      if job_started < 0 then job_started = nil end
      local slots, api = flat[b + 11], flat[b + 13]
      if slots == 0 then slots = 1 end
      if api == "" then api = "llamacpp" end
      local w = {
        id = id, pool_id = pool_id, status = flat[b + 2], model_ref = flat[b + 3],
        gpu_ids = gpus, vram_bytes = flat[b + 4], uri = flat[b + 5], current_job_id = current,
        job_started_at = job_started, jobs_completed = flat[b + 7],
        avg_tokens_per_sec = flat[b + 8], started_at_ms = flat[b + 9],
        last_used_at_ms = flat[b + 10], slots_total = slots, slots_busy = flat[b + 12],
        active_job_ids = active, api = api,
      }
      local list = ensure_pool(pool_id).workers
      if worker_pool[id] == pool_id then
        local at = index_of(list, id)
        n_running = n_running - #list[at].active_job_ids
        list[at] = w
      else
        remove_worker(id)
        if fresh[list] or #list == 0 then
          fresh[list] = true
          list[#list + 1] = w
        else
          insert_sorted(list, w, by_id)
        end
        worker_pool[id] = pool_id
        n_workers = n_workers + 1
      end
      n_running = n_running + n_active
    end
    for list in next, fresh do t_sort(list, by_id) end
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
  -- the workers' active_job_ids (up to every slot of every worker). The snapshot's
  -- rows are counted while they are kept, whether their jobs are still queued or not.
  local function counts()
    return n_jobs, n_workers, n_gpus, #model_list, #tenant_ids, n_running,
      n_job_blocks + n_held, snap_rows
  end

  return {
    reset = reset, put_jobs = put_jobs, put_snapshot_jobs = put_snapshot_jobs,
    remove_jobs = remove_jobs, commit = commit, put_pool = put_pool, remove_pool = remove_pool,
    put_gpus = put_gpus, remove_gpu = remove_gpu, remove_worker = remove_worker,
    put_workers = put_workers, clear_catalog = clear_catalog, put_model = put_model,
    put_alias = put_alias, clear_tenants = clear_tenants, put_tenant = put_tenant,
    set_metrics = set_metrics, set_config = set_config, counts = counts,
    put_blocks = put_blocks, set_block_tokens = set_block_tokens,
    queue_merges = function() return merges end,
    -- What the built-ins and ctx.lua read. They never write to these tables.
    view = {
      jobs = jobs, pools = pools, pool_ids = pool_ids, worker_pool = worker_pool,
      models = models, model_list = model_list, aliases = aliases, base_refs = base_refs,
      tenants = tenants, tenant_ids = tenant_ids, metrics = metrics, config = config,
      job_blocks = job_blocks, job_session = job_session, held = held, prefix = prefix,
      current_queue = current_queue,
    },
  }
end
