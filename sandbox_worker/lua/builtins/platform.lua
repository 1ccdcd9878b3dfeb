-- Built-ins of runtime-spec section 4.9: the platform scheduler. host.load sets what
-- they return: the platform scheduler's schedule() and its source.
return function(P, B, lib)
  local want = lib.want

  local platform_schedule = nil
  local platform_source = nil
  local expose_platform_source = true

  function B.platform_schedule(ctx)
    want("platform_schedule", 1, ctx, "table")
    return platform_schedule(ctx)
  end

  function B.get_platform_scheduler_source()
    if expose_platform_source then return platform_source end
    return nil
  end

  return {
    set_source = function(source, expose)
      platform_source = source
      expose_platform_source = expose
    end,
    set_schedule = function(schedule) platform_schedule = schedule end,
  }
end
