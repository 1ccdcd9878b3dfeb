-- Template: fair share across tenants.
-- @version 1.0.0
-- Each cycle serves the tenant using the smallest share of its concurrency quota
-- (or, without a quota, running the fewest jobs), oldest job first, so that no
-- tenant with a deep queue starves the others. Quotas are always respected.

local function share(tenant)
  if tenant == nil then return 0 end
  local quota = tenant.quota_max_concurrent_jobs
  if quota and quota > 0 then return tenant.concurrent_jobs / quota end
  return tenant.concurrent_jobs
end

function schedule(ctx)
  local best, best_worker, best_share = nil, nil, nil
  for _, job in ipairs(ctx.queue) do
    local tenant = job.tenant_id and ctx.tenants[job.tenant_id]
    local s = share(tenant)
    if best == nil or s < best_share then
      local worker = ctx.find_least_loaded_worker(job.model_ref)
      if worker and ctx.can_job_fit(job, worker) and ctx.check_tenant_quota(job.tenant_id, job) then
        best, best_worker, best_share = job, worker, s
      end
    end
  end
  if best then
    return { action = "dispatch", job_id = best.id, worker_id = best_worker.id,
             reason = "tenant share " .. string.format("%.2f", best_share), rule = "fair-share" }
  end
  return ctx.platform_schedule(ctx)
end
