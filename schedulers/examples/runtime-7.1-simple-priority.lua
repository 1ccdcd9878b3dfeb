function schedule(ctx)
  -- Process interactive jobs first
  for _, job in ipairs(ctx.queue) do
    if job.priority == "interactive" then
      local worker = ctx.find_least_loaded_worker(job.model_ref)
      if worker then
        ctx.log_info("Dispatching interactive job: " .. job.id)
        return {
          action = "dispatch",
          job_id = job.id,
          worker_id = worker.id
        }
      end
    end
  end
  
  -- Then batch jobs
  for _, job in ipairs(ctx.queue) do
    if job.priority == "batch" then
      local worker = ctx.find_most_vram_free_worker(job.model_ref)
      if worker then
        return {
          action = "dispatch",
          job_id = job.id,
          worker_id = worker.id
        }
      end
    end
  end
  
  return { action = "wait" }
end
