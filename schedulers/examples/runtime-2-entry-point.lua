-- Main entry point called by orchestratord
-- @param ctx: SchedulerContext - Complete system state
-- @return SchedulerDecision - What action to take
function schedule(ctx)
  -- User's custom scheduling logic here
  
  -- Example: dispatch first job to least-loaded worker
  local job = ctx.queue[1]
  if job then
    local worker = ctx.find_least_loaded_worker(job.model_ref)
    if worker then
      return {
        action = "dispatch",
        job_id = job.id,
        worker_id = worker.id
      }
    end
  end
  
  -- No action
  return { action = "wait" }
end
