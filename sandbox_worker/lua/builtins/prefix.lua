-- Built-ins of issue 16 (docs/RUNTIME-EXTENSIONS.md): prompt prefixes and sessions.
-- The Python side of the same functions is orchestrator/domain/prefix_queries.py (the YAML
-- interpreter's); the two must agree.
--
-- What a worker holds is the core's belief (orchestrator/state/prefix.py): the blocks
-- of the prompts it was sent, bounded by its KV capacity. A job's blocks are chained
-- hashes, so a worker holding block i of a prompt holds its prefix up to i; the match
-- stops at the first block it lacks, as a server's reuse does.
return function(P, B, lib, data, copies)
  local type, ipairs, t_sort = P.type, P.ipairs, P.t_sort
  local want_opt, arg_error, resolve = lib.want_opt, lib.arg_error, lib.resolve
  local pools, pool_ids, worker_pool, jobs = data.pools, data.pool_ids, data.worker_pool, data.jobs
  local job_blocks, job_session, held, prefix = data.job_blocks, data.job_session, data.held,
    data.prefix
  local worker_copy = copies.worker_copy

  -- A job is a queued job (or any table with its id) or an id; so is a worker.
  local function id_of(fname, index, value, what)
    if type(value) == "string" then return value end
    if type(value) == "table" and type(value.id) == "string" then return value.id end
    arg_error(fname, index, what .. " or its id", value)
  end

  local function matched(job_id, worker_id)
    local hashes, set = job_blocks[job_id], held[worker_id]
    if hashes == nil or set == nil then return 0 end
    local n = 0
    for i = 1, #hashes do
      if not set[hashes[i]] then break end
      n = n + 1
    end
    return n
  end

  local function master_worker(worker_id)
    local pool = pools[worker_pool[worker_id] or ""]
    if not pool then return nil end
    for _, w in ipairs(pool.workers) do
      if w.id == worker_id then return w end
    end
    return nil
  end

  -- tokens, blocks: how much of the job's prompt the worker is believed to hold.
  function B.prefix_match(job, worker)
    local job_id = id_of("prefix_match", 1, job, "a job")
    local worker_id = id_of("prefix_match", 2, worker, "a worker")
    local blocks = matched(job_id, worker_id)
    local queued = jobs[job_id]
    local prompt = (queued and queued.prompt_tokens) or blocks * prefix.block_tokens
    local tokens = blocks * prefix.block_tokens
    if tokens > prompt then tokens = prompt end
    return tokens, blocks
  end

  -- The ready or busy workers of the job's model: the most blocks matched first, then
  -- the smallest busy share of slots, then by id. Copies, like every find_*.
  function B.find_workers_by_prefix(job)
    local job_id = id_of("find_workers_by_prefix", 1, job, "a job")
    local queued = jobs[job_id]
    local model_ref = (queued and queued.model_ref)
      or (type(job) == "table" and job.model_ref) or nil
    want_opt("find_workers_by_prefix", 1, model_ref, "string")
    if model_ref == nil then return {} end
    local want_ref = resolve(model_ref)
    local found, blocks, share = {}, {}, {}
    for _, id in ipairs(pool_ids) do
      for _, w in ipairs(pools[id].workers) do
        if (w.status == "ready" or w.status == "busy") and resolve(w.model_ref) == want_ref then
          found[#found + 1] = w
          blocks[w] = matched(job_id, w.id)
          share[w] = w.slots_busy / w.slots_total
        end
      end
    end
    t_sort(found, function(a, b)
      if blocks[a] ~= blocks[b] then return blocks[a] > blocks[b] end
      if share[a] ~= share[b] then return share[a] < share[b] end
      return a.id < b.id
    end)
    for i, w in ipairs(found) do found[i] = worker_copy(w) end
    return found
  end

  -- The worker the job's session last ran on, while it is still there; else nil.
  function B.session_worker(job)
    local job_id = id_of("session_worker", 1, job, "a job")
    local worker_id = job_session[job_id]
    local w = worker_id and master_worker(worker_id)
    return w and worker_copy(w) or nil
  end
end
