-- User-defined scheduler
function schedule(context)
  local queue = context.queue
  local pools = context.pools
  
  -- Custom logic: prioritize jobs with seed for determinism
  for _, job in ipairs(queue) do
    if job.seed ~= nil then
      local worker = find_best_worker(pools, job.model_ref)
      if worker then
        return {
          action = "dispatch",
          job_id = job.id,
          worker_id = worker.id
        }
      end
    end
  end
  
  -- Fallback to platform scheduler
  return platform.schedule(context)
end
