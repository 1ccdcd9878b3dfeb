-- Built-ins of runtime-spec section 4.7: eviction.
return function(P, B, lib, data, on_now)
  local ipairs, m_floor, m_max = P.ipairs, P.m_floor, P.m_max
  local want, want_opt, resolve = lib.want, lib.want_opt, lib.resolve
  local pick_min, vram_totals = lib.pick_min, lib.vram_totals
  local pools, pool_ids, config = data.pools, data.pool_ids, data.config

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  -- Only idle workers are candidates: evicting one that runs a job, in any of its
  -- slots, would kill the job.
  local function idle_workers(pool_id)
    local out = {}
    for _, id in ipairs(pool_ids) do
      if pool_id == nil or id == pool_id then
        for _, w in ipairs(pools[id].workers) do
          if (w.status == "ready" or w.status == "failed") and w.slots_busy == 0
            and w.current_job_id == nil then
            out[#out + 1] = w
          end
        end
      end
    end
    return out
  end

  local function lru_key(w) return w.last_used_at_ms * 1e-3 end

  function B.find_worker_to_evict_lru(pool_id)
    want_opt("find_worker_to_evict_lru", 1, pool_id, "string")
    return pick_min(idle_workers(pool_id), lru_key)
  end

  function B.find_worker_to_evict_lfu(pool_id)
    want_opt("find_worker_to_evict_lfu", 1, pool_id, "string")
    -- Jobs per hour of uptime; the least used goes first.
    return pick_min(idle_workers(pool_id), function(w)
      local hours = m_max(now_ms - w.started_at_ms, 1) / 3600000
      return w.jobs_completed / hours
    end)
  end

  -- Returns needed, and how many bytes of VRAM are allocated beyond the threshold.
  function B.should_evict(pool_id)
    want("should_evict", 1, pool_id, "string")
    local pool = pools[pool_id]
    if not pool then return false, 0 end
    local total, allocated = vram_totals(pool)
    local threshold = (config.eviction and config.eviction.vram_threshold) or 0.9
    local over = allocated - m_floor(threshold * total)
    if total > 0 and allocated / total > threshold then return true, over end
    return false, 0
  end

  function B.find_model_to_evict(pool_id)
    want("find_model_to_evict", 1, pool_id, "string")
    local pool = pools[pool_id]
    if not pool then return nil end
    local served = {}
    for _, w in ipairs(pool.workers) do served[resolve(w.model_ref)] = true end
    for _, ref in ipairs(pool.info.cached_models) do  -- least recently used first
      if not served[resolve(ref)] then return ref end
    end
    return nil
  end
end
