-- Template: GPU affinity.
-- @version 1.0.0
-- Large models (over 16 GiB of VRAM) run only on large GPUs (40 GiB or more), and
-- small models prefer the small GPUs, so that a small job never takes the room a
-- large model needs. Unserved large models get a worker on a large GPU.

local LARGE_MODEL = 16 * 1024^3
local LARGE_GPU = 40 * 1024^3

local function on_gpu(ctx, job, large)
  local ref = ctx.resolve_model(job.model_ref)
  local best, best_load = nil, nil
  for _, worker in ipairs(ctx.filter_workers(function(w)
    return w.status == "ready" and ctx.resolve_model(w.model_ref) == ref
  end)) do
    local pool = ctx.get_pool(worker.pool_id)
    local gpu = ctx.get_gpu(worker.pool_id, worker.gpu_ids[1] or -1)
    if pool and pool.status ~= "offline" and gpu and (gpu.vram_total_bytes >= LARGE_GPU) == large
      and ctx.can_job_fit(job, worker) and ctx.check_tenant_quota(job.tenant_id, job) then
      if best == nil or gpu.utilization_percent < best_load then best, best_load = worker, gpu.utilization_percent end
    end
  end
  return best
end

function schedule(ctx)
  for _, job in ipairs(ctx.queue) do
    local need = ctx.get_model_vram(job.model_ref)
    if need and need > LARGE_MODEL then
      local worker = on_gpu(ctx, job, true)
      if worker then
        return { action = "dispatch", job_id = job.id, worker_id = worker.id, rule = "large-models-on-large-gpus" }
      end
      if #ctx.find_workers_by_model(job.model_ref) == 0 then
        for _, gpu in ipairs(ctx.find_gpus_with_vram(need)) do
          if gpu.vram_total_bytes >= LARGE_GPU and ctx.is_pool_healthy(gpu.pool_id)
            and ctx.check_gpu_compatibility(gpu, job.model_ref) then
            return { action = "start_worker", pool_id = gpu.pool_id, gpu_id = gpu.id,
                     model_ref = ctx.resolve_model(job.model_ref), rule = "start-large-models-on-large-gpus" }
          end
        end
      end
    elseif need then
      local worker = on_gpu(ctx, job, false) or on_gpu(ctx, job, true)
      if worker then
        return { action = "dispatch", job_id = job.id, worker_id = worker.id, rule = "small-models-on-small-gpus" }
      end
    end
  end
  return ctx.platform_schedule(ctx)
end
