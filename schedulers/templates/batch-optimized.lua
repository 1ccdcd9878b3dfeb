-- Template: batch-optimized.
-- @version 1.0.0
-- Interactive jobs go first to the least-loaded worker; batch jobs go to the worker
-- with the most free VRAM, where long generations have the most room; a model that
-- is queued but served by no worker gets one; anything else is the platform's call.

local function runnable(ctx, job, worker)
  return worker ~= nil and ctx.can_job_fit(job, worker) and ctx.check_tenant_quota(job.tenant_id, job)
end

function schedule(ctx)
  for _, job in ipairs(ctx.queue) do
    if job.priority == "interactive" then
      local worker = ctx.find_least_loaded_worker(job.model_ref)
      if runnable(ctx, job, worker) then
        return { action = "dispatch", job_id = job.id, worker_id = worker.id, rule = "interactive-to-least-loaded" }
      end
    end
  end
  for _, job in ipairs(ctx.queue) do
    if job.priority == "batch" then
      local worker = ctx.find_most_vram_free_worker(job.model_ref)
      if runnable(ctx, job, worker) then
        return { action = "dispatch", job_id = job.id, worker_id = worker.id, rule = "batch-to-most-vram-free" }
      end
    end
  end
  return ctx.platform_schedule(ctx)
end
