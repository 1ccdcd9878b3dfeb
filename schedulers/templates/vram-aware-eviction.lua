-- Template: VRAM-aware eviction (runtime-spec 7.4, made safe for every context).
-- @version 1.0.0
-- When a pool's VRAM is over 90 % allocated, its least recently used idle worker
-- is evicted before anything else; then jobs go to the least-loaded worker, and
-- models nobody serves get a worker where there is room.

function schedule(ctx)
  for _, pool in ipairs(ctx.pools) do
    if ctx.get_pool_utilization(pool.id) > 0.9 then
      local worker = ctx.find_worker_to_evict_lru(pool.id)
      if worker then
        ctx.log_warn("pool " .. pool.id .. " over 90% VRAM, evicting " .. worker.id)
        return { action = "evict_worker", worker_id = worker.id, reason = "vram_threshold_exceeded",
                 rule = "evict-lru-over-threshold" }
      end
    end
  end
  for _, job in ipairs(ctx.queue) do
    local worker = ctx.find_least_loaded_worker(job.model_ref)
    if worker and ctx.can_job_fit(job, worker) and ctx.check_tenant_quota(job.tenant_id, job) then
      return { action = "dispatch", job_id = job.id, worker_id = worker.id, rule = "dispatch-least-loaded" }
    end
  end
  return ctx.platform_schedule(ctx)
end
