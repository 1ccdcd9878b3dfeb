-- The ctx each schedule() call gets: copies of metrics and config, every built-in, and
-- the fields built when first read (queue, pools, catalog, tenants, helpers). See
-- copies.lua for what is copied and when.
--
-- ctx.queue is the one of those that grows with the queue: a fresh array of the jobs'
-- read-only proxies, in queue order. Made when the script first reads it, it is on the
-- script's account, together with merging the changes since the last read into the
-- ordered queue (context.lua); a script that never reads it pays for neither.
return function(P, B, helpers_table, data, copies, on_now)
  local pairs, ipairs, setmetatable, rawset = P.pairs, P.ipairs, P.setmetatable, P.rawset
  local new_table, clear_table, copy_flat = P.new_table, P.clear_table, P.copy_flat
  local copy_array = P.copy_array
  local models, model_list, aliases = data.models, data.model_list, data.aliases
  local tenants, tenant_ids = data.tenants, data.tenant_ids
  local metrics, config, current_queue = data.metrics, data.config, data.current_queue
  local begin, all_pools, model_copy = copies.begin, copies.all_pools, copies.model_copy

  local now_ms = 0
  on_now(function(ms) now_ms = ms end)

  -- ctx.queue: where LuaJIT's table.clear exists, the same table is emptied and refilled
  -- each call (whatever a script left in it is wiped), which spares the collector 8
  -- bytes per job per call. Within a call it is handed out once: a script that reads
  -- ctx.queue again after setting it to nil gets a new array, not its first one wiped.
  local queue_copy, queue_given = nil, false

  local function fresh_queue()
    local queue = current_queue()
    if not clear_table or queue_given then return copy_array(queue) end
    queue_given = true
    if queue_copy == nil then queue_copy = new_table(#queue, 0) else clear_table(queue_copy) end
    for i = 1, #queue do queue_copy[i] = queue[i] end
    return queue_copy
  end

  -- The ctx fields that are built when first read.
  local LAZY = {
    queue = fresh_queue,
    pools = all_pools,
    helpers = helpers_table,
    catalog = function()
      local out = {}
      for _, ref in ipairs(model_list) do out[ref] = model_copy(models[ref]) end
      return { models = out, aliases = copy_flat(aliases) }
    end,
    tenants = function()
      local out = {}
      for _, id in ipairs(tenant_ids) do out[id] = copy_flat(tenants[id]) end
      return out
    end,
  }

  -- For the debugger (instrument.lua, expression.lua): a field of ctx as the script
  -- would read it, without building it on ctx, nor reusing the queue's array (which the
  -- script may still hold from its last call): looking must not change what it sees.
  local function peek(ctx, key)
    local value = P.rawget(ctx, key)
    if value ~= nil or LAZY[key] == nil then return value end
    if key == "queue" then return copy_array(current_queue()) end
    return LAZY[key]()
  end
  local lazy_names = {}
  for name in pairs(LAZY) do lazy_names[#lazy_names + 1] = name end
  P.t_sort(lazy_names)

  -- The built-ins put on each ctx: B, or instrument.lua's wrappers of them while a
  -- diagnostics worker traces, profiles or debugs a call.
  local builtins = B
  local function use_builtins(table_or_nil) builtins = table_or_nil or B end
  local function builtin(name) return builtins[name] end

  -- Builds a lazy field: calls `make`, or, while instrument.lua traces, has it call
  -- `make` with the hook off (the field is the runtime's work, like a built-in's).
  local function call(make) return make() end
  local build_field = call
  local function set_field_builder(fn) build_field = fn or call end

  local lazy_ctx = setmetatable({}, { __mode = "k" })
  local ctx_mt = {
    __index = function(ctx, key)
      local make = LAZY[key]
      if make == nil then return nil end
      local value = build_field(make)
      rawset(ctx, key, value)
      return value
    end,
    __metatable = "ctx",
  }

  -- Build every lazy field of a ctx (before pairs/next walk it).
  local function materialize(ctx)
    for key in pairs(LAZY) do local _ = ctx[key] end
  end

  local function build()
    begin()
    queue_given = false
    local ctx = setmetatable({ metrics = copy_flat(metrics), config = copy_flat(config) }, ctx_mt)
    ctx.metrics.timestamp_ms = now_ms
    for _, section in ipairs({ "queue", "timeout", "retry", "eviction" }) do
      ctx.config[section] = copy_flat(config[section] or {})
    end
    for name, fn in pairs(builtins) do ctx[name] = fn end
    lazy_ctx[ctx] = true
    return ctx
  end

  return {
    build = build, finish = copies.finish, lazy_ctx = lazy_ctx, materialize = materialize,
    use_builtins = use_builtins, builtin = builtin, set_field_builder = set_field_builder,
    peek = peek, lazy_names = lazy_names,
  }
end
