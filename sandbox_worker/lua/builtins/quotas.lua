-- Built-ins of runtime-spec sections 3.4 and 4.6: tenant quotas.
return function(P, B, lib, data)
  local want, want_opt = lib.want, lib.want_opt
  local tenants, config = data.tenants, data.config

  -- Must agree with check_tenant_quota in orchestrator/scheduling/validation.py. The
  -- third value says which quota: "flagged", "concurrent_jobs", "vram" or "tokens_daily".
  function B.check_tenant_quota(tenant_id, job)
    want("check_tenant_quota", 2, job, "table")
    if tenant_id == nil then return true, nil end  -- home/lab mode: no tenants
    want("check_tenant_quota", 1, tenant_id, "string")
    local t = tenants[tenant_id]
    if not t then
      -- As the validator: outside platform mode, a tenant nobody configured has no quota.
      if config.deployment_mode == "platform" or config.mode == "platform" then
        return false, "unknown_tenant"
      end
      return true, nil
    end
    if t.quota_exceeded then return false, "quota_exceeded", "flagged" end
    if t.quota_max_concurrent_jobs and t.concurrent_jobs + 1 > t.quota_max_concurrent_jobs then
      return false, "quota_exceeded", "concurrent_jobs"
    end
    if t.quota_vram_bytes and t.vram_used_bytes + (job.estimated_vram_bytes or 0) > t.quota_vram_bytes then
      return false, "quota_exceeded", "vram"
    end
    if t.quota_tokens_daily and t.tokens_used_today + (job.max_tokens or 0) > t.quota_tokens_daily then
      return false, "quota_exceeded", "tokens_daily"
    end
    return true, nil
  end

  function B.get_tenant_usage(tenant_id)
    want("get_tenant_usage", 1, tenant_id, "string")
    local t = tenants[tenant_id]
    if not t then return nil end
    return {
      tenant_id = t.id, vram_used_bytes = t.vram_used_bytes, concurrent_jobs = t.concurrent_jobs,
      tokens_used_today = t.tokens_used_today, quota_vram_bytes = t.quota_vram_bytes,
      quota_max_concurrent_jobs = t.quota_max_concurrent_jobs,
      quota_tokens_daily = t.quota_tokens_daily, quota_reset_at = t.quota_reset_at,
      quota_exceeded = t.quota_exceeded,
    }
  end

  function B.estimate_quota_impact(tenant_id, job)
    want_opt("estimate_quota_impact", 1, tenant_id, "string")
    want("estimate_quota_impact", 2, job, "table")
    return job.estimated_vram_bytes or 0
  end
end
