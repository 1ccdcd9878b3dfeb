-- Built-ins of runtime-spec section 4.1: worker selection.
return function(P, B, lib, copies)
  local ipairs, t_sort = P.ipairs, P.t_sort
  local want, want_opt, resolve = lib.want, lib.want_opt, lib.resolve
  local worker_gpus, ready_workers, pick_min = lib.worker_gpus, lib.ready_workers, lib.pick_min
  local each_worker = lib.each_worker
  local worker_copy = copies.worker_copy

  local rr_last = {}  -- model_ref -> worker id last picked by find_worker_round_robin

  local function by_id(a, b) return a.id < b.id end

  local function worker_load(worker)
    local gpus = worker_gpus(worker)
    if #gpus == 0 then return 0 end
    local sum = 0
    for _, g in ipairs(gpus) do sum = sum + g.utilization_percent end
    return sum / #gpus
  end

  local function worker_vram_free(worker)
    local sum = 0
    for _, g in ipairs(worker_gpus(worker)) do sum = sum + g.vram_free_bytes end
    return sum
  end

  -- Least loaded: the smallest share of its slots taken (docs/ARCHITECTURE.md D27),
  -- then the least utilized GPUs, then the lowest id. With one slot per worker every
  -- candidate's share is 0, and this is the spec's GPU-utilization order.
  function B.find_least_loaded_worker(model_ref, pool_id)
    want("find_least_loaded_worker", 1, model_ref, "string")
    want_opt("find_least_loaded_worker", 2, pool_id, "string")
    local best, best_share, best_load = nil, nil, nil
    for _, w in ipairs(ready_workers(model_ref, pool_id)) do
      local share, load = w.slots_busy / w.slots_total, worker_load(w)
      if best == nil or share < best_share
        or (share == best_share and (load < best_load or (load == best_load and w.id < best.id))) then
        best, best_share, best_load = w, share, load
      end
    end
    return best and worker_copy(best)
  end

  function B.find_most_vram_free_worker(model_ref)
    want("find_most_vram_free_worker", 1, model_ref, "string")
    return pick_min(ready_workers(model_ref), function(w) return -worker_vram_free(w) end)
  end

  function B.find_ready_worker(model_ref)
    want("find_ready_worker", 1, model_ref, "string")
    local w = ready_workers(model_ref)[1]
    return w and worker_copy(w)
  end

  function B.find_worker_round_robin(model_ref)
    want("find_worker_round_robin", 1, model_ref, "string")
    local candidates = ready_workers(model_ref)
    if #candidates == 0 then return nil end
    t_sort(candidates, by_id)
    local key = resolve(model_ref)
    local last = rr_last[key]
    local chosen = candidates[1]
    if last then
      for _, w in ipairs(candidates) do
        if w.id > last then chosen = w break end
      end
    end
    rr_last[key] = chosen.id
    return worker_copy(chosen)
  end

  function B.filter_workers(predicate)
    want("filter_workers", 1, predicate, "function")
    local out = {}
    each_worker(function(w)
      local copy = worker_copy(w)
      if predicate(copy) then out[#out + 1] = copy end
    end)
    return out
  end
end
