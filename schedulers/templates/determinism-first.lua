-- Template: determinism-first (runtime-spec 7.3, made safe for every context).
-- @version 1.0.0
-- Jobs that carry a seed, for models that can reproduce a run, are dispatched
-- before anything else, to the first ready worker; everything else follows the
-- platform scheduler.

function schedule(ctx)
  for _, job in ipairs(ctx.filter_jobs(function(job) return job.seed ~= nil end)) do
    local model = ctx.get_model(job.model_ref)
    if model and model.supports_determinism then
      local worker = ctx.find_ready_worker(job.model_ref)
      if worker and ctx.can_job_fit(job, worker) and ctx.check_tenant_quota(job.tenant_id, job) then
        ctx.log_debug("deterministic job " .. job.id .. " (seed " .. job.seed .. ")")
        return { action = "dispatch", job_id = job.id, worker_id = worker.id, rule = "seeded-jobs-first" }
      end
    end
  end
  return ctx.platform_schedule(ctx)
end
