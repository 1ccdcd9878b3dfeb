function schedule(ctx)
  -- Check if any pool is over VRAM threshold
  for _, pool in ipairs(ctx.pools) do
    local utilization = ctx.get_pool_utilization(pool.id)
    
    if utilization > 0.9 then
      -- Evict LRU worker to free VRAM
      local worker_to_evict = ctx.find_worker_to_evict_lru(pool.id)
      if worker_to_evict then
        ctx.log_warn("Pool " .. pool.id .. " over threshold, evicting worker: " .. worker_to_evict.id)
        return {
          action = "evict_worker",
          worker_id = worker_to_evict.id,
          reason = "vram_threshold_exceeded"
        }
      end
    end
  end
  
  -- Normal scheduling
  local job = ctx.queue[1]
  if job then
    local worker = ctx.find_least_loaded_worker(job.model_ref)
    if worker then
      return { action = "dispatch", job_id = job.id, worker_id = worker.id }
    end
  end
  
  return { action = "wait" }
end
