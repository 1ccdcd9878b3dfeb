-- Built-ins of runtime-spec section 4.3: GPUs.
return function(P, B, lib, data, copies)
  local ipairs, tonumber, s_match = P.ipairs, P.tonumber, P.s_match
  local want, resolve, online, tokens_per_sec = lib.want, lib.resolve, lib.online,
    lib.tokens_per_sec
  local pools, pool_ids, models = data.pools, data.pool_ids, data.models
  local gpu_copy = copies.gpu_copy

  function B.find_gpus_with_vram(vram_needed)
    want("find_gpus_with_vram", 1, vram_needed, "number")
    local out = {}
    for _, id in ipairs(pool_ids) do
      local pool = pools[id]
      if online(pool) then
        for _, g in ipairs(pool.gpus) do
          if g.vram_free_bytes >= vram_needed then out[#out + 1] = gpu_copy(g) end
        end
      end
    end
    return out
  end

  function B.get_gpu(pool_id, gpu_id)
    want("get_gpu", 1, pool_id, "string")
    want("get_gpu", 2, gpu_id, "number")
    local pool = pools[pool_id]
    if not pool then return nil end
    for _, g in ipairs(pool.gpus) do if g.id == gpu_id then return gpu_copy(g) end end
    return nil
  end

  local function version_at_least(actual, required)
    if required == nil or required == "" then return true end
    local a1, a2 = s_match(actual or "", "^(%d+)%.?(%d*)$")
    local r1, r2 = s_match(required, "^(%d+)%.?(%d*)$")
    if not a1 or not r1 then return false end
    a1, a2, r1, r2 = tonumber(a1), tonumber(a2) or 0, tonumber(r1), tonumber(r2) or 0
    return a1 > r1 or (a1 == r1 and a2 >= r2)
  end

  -- Must agree with check_gpu_compatibility in orchestrator/scheduling/validation.py.
  function B.check_gpu_compatibility(gpu, model_ref)
    want("check_gpu_compatibility", 1, gpu, "table")
    want("check_gpu_compatibility", 2, model_ref, "string")
    local model = models[resolve(model_ref)]
    if not model then return false, "unknown_model" end
    if gpu.vram_total_bytes < model.vram_required_bytes then return false, "insufficient_vram" end
    if not version_at_least(gpu.compute_capability, model.min_compute_capability) then
      return false, "compute_capability_too_low"
    end
    return true, nil
  end

  function B.estimate_performance(model_ref, gpu)
    want("estimate_performance", 1, model_ref, "string")
    want("estimate_performance", 2, gpu, "table")
    local model = models[resolve(model_ref)]
    if not model then return 0 end
    return tokens_per_sec(model, gpu.device_name or "")
  end
end
