function schedule(ctx)
  -- Prioritize jobs with seeds (deterministic inference)
  local seeded_jobs = ctx.filter_jobs(function(job)
    return job.seed ~= nil
  end)
  
  for _, job in ipairs(seeded_jobs) do
    local model = ctx.get_model(job.model_ref)
    
    -- Only dispatch if model supports determinism
    if model.supports_determinism then
      local worker = ctx.find_ready_worker(job.model_ref)
      if worker then
        ctx.log_info("Dispatching deterministic job: " .. job.id .. " (seed: " .. job.seed .. ")")
        return { action = "dispatch", job_id = job.id, worker_id = worker.id }
      end
    end
  end
  
  -- Fallback to platform scheduler for non-seeded jobs
  return ctx.platform_schedule(ctx)
end
