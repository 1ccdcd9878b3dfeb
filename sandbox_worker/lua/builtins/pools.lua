-- Built-ins of runtime-spec sections 3.2 and 4.2: pools.
return function(P, B, lib, data, copies, refresh_state)
  local ipairs, error = P.ipairs, P.error
  local want, online, vram_totals = lib.want, lib.online, lib.vram_totals
  local resolve, each_worker = lib.resolve, lib.each_worker
  local pools, pool_ids = data.pools, data.pool_ids
  local pool_copy, worker_copy, all_pools = copies.pool_copy, copies.worker_copy, copies.all_pools

  function B.get_pool(pool_id)
    want("get_pool", 1, pool_id, "string")
    local pool = pools[pool_id]
    return pool and pool_copy(pool)
  end

  function B.filter_pools(predicate)
    want("filter_pools", 1, predicate, "function")
    local out = {}
    for _, pool in ipairs(all_pools()) do if predicate(pool) then out[#out + 1] = pool end end
    return out
  end

  function B.get_all_workers()
    local out = {}
    each_worker(function(w) out[#out + 1] = worker_copy(w) end)
    return out
  end

  function B.find_workers_by_model(model_ref)
    want("find_workers_by_model", 1, model_ref, "string")
    local want_ref = resolve(model_ref)
    local out = {}
    each_worker(function(w)
      if resolve(w.model_ref) == want_ref then out[#out + 1] = worker_copy(w) end
    end)
    return out
  end

  function B.refresh_pool_state()
    local fresh = refresh_state()
    if fresh ~= nil then return fresh end
    -- The core has been asked for fresh state: abandon this call; the core calls again
    -- with fresh pools, and then this returns true. Swallowing the error changes nothing.
    error("ctx.refresh_pool_state: fetching fresh pool state", 2)
  end

  function B.find_pools_with_capacity(vram_needed)
    want("find_pools_with_capacity", 1, vram_needed, "number")
    local out = {}
    for _, id in ipairs(pool_ids) do
      local pool = pools[id]
      if online(pool) then
        for _, g in ipairs(pool.gpus) do
          if g.vram_free_bytes >= vram_needed then out[#out + 1] = pool_copy(pool) break end
        end
      end
    end
    return out
  end

  function B.is_pool_healthy(pool_id)
    want("is_pool_healthy", 1, pool_id, "string")
    local pool = pools[pool_id]
    return pool ~= nil and pool.info.status == "healthy"
  end

  function B.get_pool_utilization(pool_id)
    want("get_pool_utilization", 1, pool_id, "string")
    local pool = pools[pool_id]
    if not pool then return 0 end
    local total, allocated = vram_totals(pool)
    if total == 0 then return 0 end
    return allocated / total
  end
end
