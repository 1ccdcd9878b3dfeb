function schedule(ctx)
  -- User has 2x RTX 4090 (GPU 0,1) and 1x A100 (GPU 2)
  -- Strategy: Small models on 4090s, large models on A100
  
  local job = ctx.queue[1]
  if not job then
    return { action = "wait" }
  end
  
  local model = ctx.get_model(job.model_ref)
  local vram_needed = model.vram_required_bytes
  
  -- Large model (>16GB) → A100 only
  if vram_needed > 16 * 1024^3 then
    local a100_worker = ctx.filter_workers(function(w)
      return w.status == "ready" and w.gpu_ids[1] == 2
    end)[1]
    
    if a100_worker then
      return { action = "dispatch", job_id = job.id, worker_id = a100_worker.id }
    else
      -- Start worker on A100
      return {
        action = "start_worker",
        pool_id = "pool-1",
        gpu_id = 2,
        model_ref = job.model_ref
      }
    end
  end
  
  -- Small model → 4090s (round-robin between GPU 0 and 1)
  local rtx_workers = ctx.filter_workers(function(w)
    return w.status == "ready" and (w.gpu_ids[1] == 0 or w.gpu_ids[1] == 1)
  end)
  
  if #rtx_workers > 0 then
    local worker = rtx_workers[1]
    return { action = "dispatch", job_id = job.id, worker_id = worker.id }
  end
  
  return { action = "wait" }
end
