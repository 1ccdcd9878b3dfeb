-- What the built-ins share: argument checks, model resolution, and the worker and GPU
-- queries several runtime-spec sections use. Not built-ins themselves.
return function(P, data, copies)
  local type, pairs, ipairs, error = P.type, P.pairs, P.ipairs, P.error
  local s_format, s_sub = P.s_format, P.s_sub
  local pools, pool_ids, worker_pool = data.pools, data.pool_ids, data.worker_pool
  local models, aliases, base_refs = data.models, data.aliases, data.base_refs
  local worker_copy = copies.worker_copy

  local function arg_error(fname, index, expected, value)
    error(s_format("ctx.%s: argument #%d must be %s, got %s", fname, index, expected, type(value)), 3)
  end

  local function want(fname, index, value, expected)
    if type(value) ~= expected then arg_error(fname, index, "a " .. expected, value) end
  end

  local function want_opt(fname, index, value, expected)
    if value ~= nil and type(value) ~= expected then
      arg_error(fname, index, "a " .. expected .. " or nil", value)
    end
  end

  -- Must stay identical to Catalog.resolve in orchestrator/domain/context.py.
  local function resolve(model)
    local target = aliases[model]
    if target then return target end
    if models[model] then return model end
    local base = base_refs[model]
    if base then return base end
    return model
  end

  local function tokens_per_sec(model, device_name)
    local tps = model.estimated_tokens_per_sec
    local exact = tps[device_name]
    if exact then return exact end
    -- NVML reports "NVIDIA A100-SXM4-80GB" where catalogs say "NVIDIA A100".
    local best, best_len = nil, 0
    for name, value in pairs(tps) do
      if name ~= "default" and #name > best_len and s_sub(device_name, 1, #name) == name then
        best, best_len = value, #name
      end
    end
    return best or tps.default or 0
  end

  local function online(pool) return pool ~= nil and pool.info.status ~= "offline" end

  -- The master GPUs a worker (master or copy) runs on.
  local function worker_gpus(worker)
    local pool = pools[worker_pool[worker.id] or ""]
    local out = {}
    if not pool then return out end
    for _, gpu_id in ipairs(worker.gpu_ids) do
      for _, g in ipairs(pool.gpus) do
        if g.id == gpu_id then out[#out + 1] = g end
      end
    end
    return out
  end

  -- Can the worker take one more job? Ready with a slot free (docs/ARCHITECTURE.md D27).
  -- With one slot this is the spec's status == "ready". A table a script made itself
  -- may lack the slot fields: it reads as the spec's one-slot worker.
  local function has_free_slot(worker)
    return worker.status == "ready" and (worker.slots_busy or 0) < (worker.slots_total or 1)
  end

  -- Ready master workers with a free slot that serve `model_ref`, in pool then id order.
  local function ready_workers(model_ref, pool_id)
    local want_ref = resolve(model_ref)
    local out = {}
    for _, id in ipairs(pool_ids) do
      local pool = pools[id]
      if online(pool) and (pool_id == nil or id == pool_id) then
        for _, w in ipairs(pool.workers) do
          if has_free_slot(w) and resolve(w.model_ref) == want_ref then out[#out + 1] = w end
        end
      end
    end
    return out
  end

  -- The candidate with the smallest key (ties broken by worker id), as a copy.
  local function pick_min(candidates, key)
    local best, best_key = nil, nil
    for _, w in ipairs(candidates) do
      local k = key(w)
      if best == nil or k < best_key or (k == best_key and w.id < best.id) then best, best_key = w, k end
    end
    return best and worker_copy(best)
  end

  local function each_worker(fn)
    for _, id in ipairs(pool_ids) do
      for _, w in ipairs(pools[id].workers) do fn(w) end
    end
  end

  local function vram_totals(pool)
    local total, allocated = 0, 0
    for _, g in ipairs(pool.gpus) do
      total = total + g.vram_total_bytes
      allocated = allocated + g.vram_allocated_bytes
    end
    return total, allocated
  end

  return {
    arg_error = arg_error, want = want, want_opt = want_opt, resolve = resolve,
    tokens_per_sec = tokens_per_sec, online = online, worker_gpus = worker_gpus,
    has_free_slot = has_free_slot, ready_workers = ready_workers, pick_min = pick_min,
    each_worker = each_worker,
    vram_totals = vram_totals,
  }
end
