-- Built-ins of runtime-spec section 4.5: jobs.
return function(P, B, lib, data, on_now)
  local m_ceil = P.m_ceil
  local want, want_opt, resolve = lib.want, lib.want_opt, lib.resolve
  local tokens_per_sec, worker_gpus = lib.tokens_per_sec, lib.worker_gpus
  local has_free_slot = lib.has_free_slot
  local pools, worker_pool, models = data.pools, data.worker_pool, data.models

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  -- Never negative: a job queued after the context's time has waited 0 ms.
  local function waited(job)
    local ms = now_ms - job.queued_at
    if ms < 0 then return 0 end
    return ms
  end

  function B.calculate_wait_time(job)
    want("calculate_wait_time", 1, job, "table")
    return waited(job)
  end

  function B.estimate_job_duration(job, worker)
    want("estimate_job_duration", 1, job, "table")
    want_opt("estimate_job_duration", 2, worker, "table")
    if worker then
      local tps = worker.avg_tokens_per_sec or 0
      if tps <= 0 then
        local model = models[resolve(job.model_ref)]
        local gpu = worker_gpus(worker)[1]
        if model and gpu then tps = tokens_per_sec(model, gpu.device_name) end
      end
      if tps > 0 then return m_ceil(job.max_tokens / tps * 1000) end
    end
    return job.estimated_duration_ms
  end

  -- Must agree with check_job_fit in orchestrator/scheduling/validation.py.
  function B.can_job_fit(job, worker)
    want("can_job_fit", 1, job, "table")
    if worker == nil then return false, "no_worker" end
    want("can_job_fit", 2, worker, "table")
    local pool = pools[worker_pool[worker.id] or ""]
    if pool and pool.info.status == "offline" then return false, "pool_offline" end
    if not has_free_slot(worker) then return false, "worker_not_ready" end
    if resolve(worker.model_ref) ~= resolve(job.model_ref) then return false, "model_mismatch" end
    if (worker.vram_bytes or 0) < (job.estimated_vram_bytes or 0) then
      return false, "insufficient_vram"
    end
    return true, nil
  end

  local PRIORITY_BASE = { interactive = 1000, batch = 100 }

  function B.get_job_priority_score(job)
    want("get_job_priority_score", 1, job, "table")
    -- Priority class first; within it, one point per second waited (aging).
    return (PRIORITY_BASE[job.priority] or 0) + waited(job) / 1000
  end
end
