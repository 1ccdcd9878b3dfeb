-- Template: clone-platform. A copy of schedulers/platform.lua to start your own policy from.
-- Change what you need; the platform scheduler itself stays your fallback.
-- platform.lua: the built-in platform scheduler.
-- @name platform
-- @version 1.0.0
--
-- The reference policy (programmable-scheduler-spec section 5), and the fallback
-- for every user scheduler. It is read-only: in home/lab mode you can read it with
-- ctx.get_platform_scheduler_source() and start your own policy from a copy.
--
-- Each cycle it returns every action it can take at once, as a batch:
--   1. interactive before batch: it walks ctx.queue, which is already ordered by
--      priority and then arrival;
--   2. least-loaded worker: each job goes to a worker serving its model that has a
--      free slot (a batched server runs up to slots_total jobs at once, so one
--      worker can take several jobs in a cycle): the one with the smallest share of
--      its slots busy, counting this cycle's dispatches, then whose GPUs are least
--      utilized; with one slot per worker, the idle worker on the least utilized GPUs;
--   3. tenant quotas: a job whose tenant is over a quota waits (counting the jobs
--      this cycle already handed out);
--   4. LRU eviction: in a pool over the VRAM threshold, the least recently used
--      idle worker (no job in any slot) whose model nobody is waiting for is evicted;
--   5. preemptive starts: a queued model that no worker serves gets a worker on
--      the GPU with the most free VRAM; one that cannot fit anywhere makes room by
--      evicting an idle, unneeded worker (the start follows next cycle).
-- Every action carries `rule`, so logs and reports can say which part decided.

local MAX_DISPATCHES = 128      -- per cycle; the rest go next cycle
local SCALE_UP_BACKLOG = 8      -- queued jobs per worker before another is started

-- Average utilization of a worker's GPUs: the load measure of "least loaded".
local function worker_load(pool, worker)
  local sum, n = 0, 0
  for _, gpu_id in ipairs(worker.gpu_ids) do
    for _, gpu in ipairs(pool.gpus) do
      if gpu.id == gpu_id then sum, n = sum + gpu.utilization_percent, n + 1 end
    end
  end
  if n == 0 then return 0 end
  return sum / n
end

-- A worker that runs no job in any of its slots: the only kind that may be evicted.
local function idle(worker)
  return (worker.status == "ready" or worker.status == "failed")
    and worker.slots_busy == 0 and worker.current_job_id == nil
end

-- Least loaded first: the smallest share of slots busy (compared as busy_a / total_a
-- < busy_b / total_b, without division), then GPU utilization, then id.
local function less_loaded(a, b)
  local share_a, share_b = a.busy * b.total, b.busy * a.total
  if share_a ~= share_b then return share_a < share_b end
  if a.load ~= b.load then return a.load < b.load end
  return a.worker.id < b.worker.id
end

-- Slots taken. A record that names a current job but counts no busy slot (a context
-- written for the spec alone) has that job in its one slot.
local function busy_slots(worker)
  if worker.current_job_id ~= nil and worker.slots_busy == 0 then return 1 end
  return worker.slots_busy
end

-- Workers with a free slot by model, least loaded first; and how many workers serve
-- each model. A ready worker has a free slot: it is "busy" only when all are taken.
local function survey_workers(ctx)
  local open, serving = {}, {}
  for _, pool in ipairs(ctx.pools) do
    if pool.status ~= "offline" then
      for _, worker in ipairs(pool.workers) do
        local ref = ctx.resolve_model(worker.model_ref)
        local busy = busy_slots(worker)
        if worker.status ~= "failed" then serving[ref] = (serving[ref] or 0) + 1 end
        if worker.status == "ready" and busy < worker.slots_total then
          open[ref] = open[ref] or {}
          table.insert(open[ref], {
            worker = worker, load = worker_load(pool, worker),
            busy = busy, total = worker.slots_total,
          })
        end
      end
    end
  end
  for _, list in pairs(open) do table.sort(list, less_loaded) end
  return open, serving
end

-- One more of the candidate's slots is taken: it leaves the list when none is left,
-- or else moves back to its place in the load order.
local function take_slot(candidates, i)
  local candidate = table.remove(candidates, i)
  candidate.busy = candidate.busy + 1
  if candidate.busy >= candidate.total then return end
  local at = #candidates + 1
  for j, other in ipairs(candidates) do
    if less_loaded(candidate, other) then at = j break end
  end
  table.insert(candidates, at, candidate)
end

-- Quota check that also counts what this cycle already gave the tenant.
local function quota_allows(ctx, job, claimed)
  local tenant_id = job.tenant_id
  if tenant_id == nil then return true end
  local tenant = ctx.tenants[tenant_id]
  if tenant == nil then  -- unknown tenant: allowed outside platform mode
    return ctx.config.deployment_mode ~= "platform" and ctx.config.mode ~= "platform"
  end
  local c = claimed[tenant_id] or { jobs = 0, vram = 0, tokens = 0 }
  if tenant.quota_exceeded then return false end
  if tenant.quota_max_concurrent_jobs
    and tenant.concurrent_jobs + c.jobs + 1 > tenant.quota_max_concurrent_jobs then
    return false
  end
  if tenant.quota_vram_bytes
    and tenant.vram_used_bytes + c.vram + job.estimated_vram_bytes > tenant.quota_vram_bytes then
    return false
  end
  if tenant.quota_tokens_daily
    and tenant.tokens_used_today + c.tokens + job.max_tokens > tenant.quota_tokens_daily then
    return false
  end
  return true
end

local function claim(claimed, job)
  if job.tenant_id == nil then return end
  local c = claimed[job.tenant_id] or { jobs = 0, vram = 0, tokens = 0 }
  c.jobs = c.jobs + 1
  c.vram = c.vram + job.estimated_vram_bytes
  c.tokens = c.tokens + job.max_tokens
  claimed[job.tenant_id] = c
end

-- The compatible GPU with the most free VRAM left after this cycle's starts.
local function best_gpu(ctx, model_ref, need, reserved)
  local best, best_pool, best_free = nil, nil, -1
  for _, pool in ipairs(ctx.pools) do
    if pool.status ~= "offline" then
      for _, gpu in ipairs(pool.gpus) do
        local free = gpu.vram_free_bytes - (reserved[pool.id .. "/" .. gpu.id] or 0)
        if free >= need and free > best_free and ctx.check_gpu_compatibility(gpu, model_ref) then
          best, best_pool, best_free = gpu, pool, free
        end
      end
    end
  end
  return best_pool, best
end

-- An idle worker nobody is waiting for, whose eviction would make room for `need`.
local function eviction_for(ctx, model_ref, need, demand, touched)
  local best = nil
  for _, pool in ipairs(ctx.pools) do
    if pool.status ~= "offline" then
      for _, worker in ipairs(pool.workers) do
        local ref = ctx.resolve_model(worker.model_ref)
        if idle(worker) and not touched[worker.id] and (demand[ref] or 0) == 0 then
          local gpu = ctx.get_gpu(pool.id, worker.gpu_ids[1] or -1)
          if gpu and gpu.vram_free_bytes + worker.vram_bytes >= need
            and ctx.check_gpu_compatibility(gpu, model_ref)
            and (best == nil or worker.last_used_at_ms < best.last_used_at_ms) then
            best = worker
          end
        end
      end
    end
  end
  return best
end

function schedule(ctx)
  local actions = {}
  local touched = {}     -- worker id -> true once an action names it
  local claimed = {}     -- tenant id -> what this cycle handed out
  local waiting = {}     -- model -> queued jobs left waiting (quota permitting)
  local order = {}       -- models in the order their first job is queued
  local open, serving = survey_workers(ctx)
  local dispatched = 0

  -- 1, 2, 3: dispatch in queue order to the least-loaded worker with a free slot,
  -- within quota.
  for _, job in ipairs(ctx.queue) do
    if quota_allows(ctx, job, claimed) then
      local ref = ctx.resolve_model(job.model_ref)
      local candidates = open[ref]
      local placed = false
      if candidates and dispatched < MAX_DISPATCHES then
        for i, candidate in ipairs(candidates) do
          if ctx.can_job_fit(job, candidate.worker) then
            take_slot(candidates, i)
            touched[candidate.worker.id] = true
            claim(claimed, job)
            dispatched = dispatched + 1
            placed = true
            actions[#actions + 1] = {
              action = "dispatch", job_id = job.id, worker_id = candidate.worker.id,
              rule = job.priority == "interactive" and "interactive-first" or "least-loaded",
            }
            break
          end
        end
      end
      if not placed then
        if waiting[ref] == nil then order[#order + 1] = ref end
        waiting[ref] = (waiting[ref] or 0) + 1
      end
    end
  end

  -- 4: LRU eviction in pools over the VRAM threshold.
  for _, pool in ipairs(ctx.pools) do
    if pool.status ~= "offline" and ctx.should_evict(pool.id) then
      local victim = nil
      for _, worker in ipairs(pool.workers) do
        local needed = (waiting[ctx.resolve_model(worker.model_ref)] or 0) > 0
        if idle(worker) and not touched[worker.id] and not needed
          and (victim == nil or worker.last_used_at_ms < victim.last_used_at_ms) then
          victim = worker
        end
      end
      if victim then
        touched[victim.id] = true
        actions[#actions + 1] = {
          action = "evict_worker", worker_id = victim.id,
          reason = "vram_threshold_exceeded", rule = "lru-eviction",
        }
      end
    end
  end

  -- 5: start workers for queued models nobody serves (and scale up long backlogs).
  local reserved = {}
  for _, ref in ipairs(order) do
    local model = ctx.get_model(ref)
    local workers_for_model = serving[ref] or 0
    local backlog = waiting[ref]
    local wanted = workers_for_model == 0
      or backlog > SCALE_UP_BACKLOG * workers_for_model
    if model and wanted then
      local need = model.vram_required_bytes
      local pool, gpu = best_gpu(ctx, ref, need, reserved)
      if gpu then
        local key = pool.id .. "/" .. gpu.id
        reserved[key] = (reserved[key] or 0) + need
        actions[#actions + 1] = {
          action = "start_worker", pool_id = pool.id, gpu_id = gpu.id, model_ref = ref,
          reason = "preload_for_queued_jobs", rule = "preemptive-start",
        }
      elseif workers_for_model == 0 then
        local victim = eviction_for(ctx, ref, need, waiting, touched)
        if victim then
          touched[victim.id] = true
          actions[#actions + 1] = {
            action = "evict_worker", worker_id = victim.id,
            reason = "make_room_for_" .. (model.family ~= "" and model.family or "model"),
            rule = "lru-eviction",
          }
        end
      end
    end
  end

  if #actions == 0 then
    local reason = #ctx.queue == 0 and "queue_empty" or "no_available_workers"
    return { action = "wait", reason = reason, rule = "idle" }
  end
  if #actions == 1 then return actions[1] end
  return { action = "batch", actions = actions }
end
