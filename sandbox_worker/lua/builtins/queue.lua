-- Built-ins of runtime-spec section 3.1: the queue.
return function(P, B, lib, data)
  local type, pairs, ipairs = P.type, P.pairs, P.ipairs
  local want, arg_error = lib.want, lib.arg_error
  local jobs, current_queue = data.jobs, data.current_queue

  function B.get_job(job_id)
    want("get_job", 1, job_id, "string")
    return jobs[job_id]
  end

  function B.filter_jobs(criteria)
    local queue = current_queue()
    local out = {}
    if type(criteria) == "function" then
      for _, job in ipairs(queue) do if criteria(job) then out[#out + 1] = job end end
    elseif type(criteria) == "table" then
      for _, job in ipairs(queue) do
        local match = true
        for k, v in pairs(criteria) do
          if job[k] ~= v then match = false break end
        end
        if match then out[#out + 1] = job end
      end
    else
      arg_error("filter_jobs", 1, "a table of field values or a predicate function", criteria)
    end
    return out
  end
end
