-- Template: cache aware.
-- @version 1.0.0
-- Each job goes to the worker that already holds the most of its prompt in its KV
-- cache, unless that worker is much busier than another: a prompt whose prefix is
-- cached skips most of its prefill. When the worker holding most of a prompt is full,
-- the job waits for it a few seconds rather than prefill everything elsewhere. A prompt
-- cached nowhere stays with the worker its session last ran on, else goes to the least
-- loaded worker. Interactive jobs go
-- first, every free slot is used, and a queued model that nobody serves, or whose
-- backlog outgrew its workers, gets a worker.
-- One batch per cycle.

-- The prefix-affinity score of a worker for a job, with the weights of the YAML
-- selection `prefix-affinity` (docs/RUNTIME-EXTENSIONS.md says where they come from):
--   CACHE_WEIGHT * (prompt tokens the worker holds / prompt tokens)
--     - LOAD_WEIGHT * (slots busy / slots total)
-- So a worker holding the whole prompt keeps winning over an idle worker until it is
-- three quarters busy; one holding half of it, until it is three eighths busier.
local CACHE_WEIGHT = 3
local LOAD_WEIGHT = 4
local MAX_DISPATCHES = 128  -- per cycle; the rest go next cycle
local SCALE_UP_BACKLOG = 8  -- jobs waiting per worker of a model before another starts
-- A job whose prompt is mostly cached on a worker with no free slot waits for that
-- worker rather than go elsewhere and prefill everything again, for up to HOLD_MS: about
-- what the cache saves of a 15,000-token prefill on an A100 (docs/SIMULATION.md).
local HOLD_SHARE = 0.5
local HOLD_MS = 5000

-- Average utilization of a worker's GPUs: how least loaded breaks a tie of busy shares.
local function gpu_load(ctx, worker)
  local sum, n = 0, 0
  for _, id in ipairs(worker.gpu_ids) do
    local gpu = ctx.get_gpu(worker.pool_id, id)
    if gpu then sum, n = sum + gpu.utilization_percent, n + 1 end
  end
  return n > 0 and sum / n or 0
end

-- The slots of `worker` taken, counting this cycle's dispatches (`taken`, by worker id).
local function busy(worker, taken)
  return worker.slots_busy + (taken[worker.id] or 0)
end

-- By model: the ready workers with a free slot (`open`), and every ready or busy one
-- (`serving`), of online pools. Built once a cycle: asking ctx.find_workers_by_prefix
-- for each queued job would copy every worker of the model per job, and a queue can
-- hold thousands of jobs.
local function workers_by_model(ctx)
  local open, serving = {}, {}
  for _, pool in ipairs(ctx.pools) do
    if pool.status ~= "offline" then
      for _, worker in ipairs(pool.workers) do
        local ref = ctx.resolve_model(worker.model_ref)
        if worker.status == "ready" or worker.status == "busy" then
          serving[ref] = serving[ref] or {}
          table.insert(serving[ref], worker)
        end
        if worker.status == "ready" and worker.slots_busy < worker.slots_total then
          open[ref] = open[ref] or {}
          table.insert(open[ref], worker)
        end
      end
    end
  end
  return open, serving
end

-- Should the job wait for a full worker (this cycle's dispatches counted) that holds
-- at least HOLD_SHARE of its prompt?
local function hold_for_cache(ctx, job, serving, taken)
  if job.prompt_blocks == 0 or job.wait_time_ms >= HOLD_MS then return false end
  for _, worker in ipairs(serving or {}) do
    if busy(worker, taken) >= worker.slots_total then
      local tokens = ctx.prefix_match(job, worker)
      if tokens >= HOLD_SHARE * job.prompt_tokens then return true end
    end
  end
  return false
end

-- The worker for `job` among the open workers of its model, and the rule that chose it.
local function choose(ctx, job, list, taken)
  local fits = {}
  for _, worker in ipairs(list) do
    if ctx.can_job_fit(job, worker) then fits[#fits + 1] = worker end
  end

  -- 1. Some worker holds part of the prompt: the best prefix-affinity score, ties to
  --    the lowest id. (A prompt shorter than one block has nothing a cache could hold.)
  if job.prompt_blocks > 0 then
    local prompt = math.max(1, job.prompt_tokens)
    local best, best_score, cached = nil, nil, false
    for _, worker in ipairs(fits) do
      local tokens = ctx.prefix_match(job, worker)
      local score = CACHE_WEIGHT * (tokens / prompt)
        - LOAD_WEIGHT * (busy(worker, taken) / worker.slots_total)
      if best == nil or score > best_score or (score == best_score and worker.id < best.id) then
        best, best_score = worker, score
      end
      cached = cached or tokens > 0
    end
    if cached then return best, "prefix-affinity" end
  end

  -- 2. Cached nowhere: the worker the job's session last ran on, which may still hold
  --    what the index has lost track of.
  local home = ctx.session_worker(job)
  if home then
    for _, worker in ipairs(fits) do
      if worker.id == home.id then return worker, "session-affinity" end
    end
  end

  -- 3. Else the least loaded: the smallest share of slots busy, then the coolest GPUs,
  --    then the lowest id (the platform scheduler's order).
  local least, least_share, least_load = nil, nil, nil
  for _, worker in ipairs(fits) do
    local share, load = busy(worker, taken) / worker.slots_total, gpu_load(ctx, worker)
    if least == nil or share < least_share or (share == least_share
      and (load < least_load or (load == least_load and worker.id < least.id))) then
      least, least_share, least_load = worker, share, load
    end
  end
  return least, "least-loaded"
end

-- One more of the worker's slots is taken: it leaves its model's open list when full.
local function take_slot(list, worker, taken)
  taken[worker.id] = (taken[worker.id] or 0) + 1
  if busy(worker, taken) < worker.slots_total then return end
  for i, other in ipairs(list) do
    if other.id == worker.id then table.remove(list, i) return end
  end
end

-- Tenant quotas, counting what this cycle already gave the tenant (as platform.lua).
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

-- How many workers that have not failed, in online pools, serve the model.
local function serving_count(ctx, model_ref)
  local n = 0
  for _, pool in ipairs(ctx.pools) do
    if pool.status ~= "offline" then
      for _, worker in ipairs(pool.workers) do
        if worker.status ~= "failed" and ctx.resolve_model(worker.model_ref) == model_ref then
          n = n + 1
        end
      end
    end
  end
  return n
end

-- The compatible GPU of an online pool with the most free VRAM left after this
-- cycle's starts (`reserved`, by "pool/gpu").
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

function schedule(ctx)
  local actions = {}
  local open, serving = workers_by_model(ctx)
  local taken = {}     -- worker id -> slots this cycle's dispatches took
  local claimed = {}   -- tenant id -> what this cycle handed out
  local waiting = {}   -- model -> true once one of its jobs is left waiting
  local order = {}     -- those models, in queue order
  local dispatched = 0

  -- ctx.queue is ordered interactive first, then by arrival.
  for _, job in ipairs(ctx.queue) do
    if quota_allows(ctx, job, claimed) then
      local ref = ctx.resolve_model(job.model_ref)
      local list = open[ref]
      local worker, rule = nil, nil
      local held = hold_for_cache(ctx, job, serving[ref], taken)
      if not held and list and #list > 0 and dispatched < MAX_DISPATCHES then
        worker, rule = choose(ctx, job, list, taken)
      end
      if held then
        -- Left queued for its cache; a later cycle places it there, or anywhere once
        -- it has waited HOLD_MS.
      elseif worker then
        take_slot(list, worker, taken)
        claim(claimed, job)
        dispatched = dispatched + 1
        actions[#actions + 1] = {
          action = "dispatch", job_id = job.id, worker_id = worker.id, rule = rule,
        }
      else
        if not waiting[ref] then order[#order + 1] = ref end
        waiting[ref] = (waiting[ref] or 0) + 1
      end
    end
  end

  -- A waiting model that nobody serves gets a worker, and so does one whose backlog
  -- outgrew its workers (as the platform scheduler scales up).
  local reserved = {}
  for _, ref in ipairs(order) do
    local model = ctx.get_model(ref)
    local workers = serving_count(ctx, ref)
    if model and (workers == 0 or waiting[ref] > SCALE_UP_BACKLOG * workers) then
      local pool, gpu = best_gpu(ctx, ref, model.vram_required_bytes, reserved)
      if gpu then
        local key = pool.id .. "/" .. gpu.id
        reserved[key] = (reserved[key] or 0) + model.vram_required_bytes
        actions[#actions + 1] = {
          action = "start_worker", pool_id = pool.id, gpu_id = gpu.id, model_ref = ref,
          reason = workers == 0 and "unserved_model" or "backlog",
          rule = workers == 0 and "start-unserved" or "scale-up",
        }
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
