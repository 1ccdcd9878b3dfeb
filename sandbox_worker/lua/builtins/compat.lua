-- The older spec's names (programmable-scheduler-spec sections 4 and 6.2): one more
-- name on ctx, and ctx.helpers with the old names and signatures. (Its global
-- `platform`, for `return platform.schedule(context)`, is set by host.load.)
-- Returns the function that builds ctx.helpers.
return function(P, B, data)
  local type, pairs = P.type, P.pairs
  local jobs = data.jobs

  B.find_worker_most_vram_free = B.find_most_vram_free_worker

  local function helpers_table()
    local helpers = {}
    for name, fn in pairs(B) do helpers[name] = fn end
    helpers.find_worker = B.find_least_loaded_worker
    helpers.find_worker_most_vram_free = B.find_most_vram_free_worker
    -- Old signature: by job id.
    helpers.calculate_wait_time = function(job_or_id)
      local job = job_or_id
      if type(job_or_id) == "string" then job = jobs[job_or_id] end
      if job == nil then return nil end
      return B.calculate_wait_time(job)
    end
    -- Old signature: (tenant_id, vram_needed) -> allowed, reason.
    helpers.check_quota = function(tenant_id, vram_needed)
      return B.check_tenant_quota(tenant_id, { estimated_vram_bytes = vram_needed or 0, max_tokens = 0 })
    end
    return helpers
  end

  return helpers_table
end
