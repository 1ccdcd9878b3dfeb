-- The debugger's read-only expressions: what `evaluate` and a breakpoint's condition
-- run (issue 18). In the security-review set.
--
-- An expression is parsed here and interpreted here: it is never compiled. The
-- interpreter reads with raw access only, so no metamethod of the script ever runs:
-- a field is read with rawget (ctx and jobs through their own __index, which is the
-- runtime's), `#` is rawlen, `==` is rawequal, and arithmetic, `..` and comparisons
-- accept numbers and strings only. It calls nothing of the script's: a call must name
-- ctx.NAME (a query built-in: no logs, metrics, refresh, round robin or platform
-- scheduler), math.NAME (not random), type or tonumber, and its arguments must be
-- values or tables of plain values. There is no function, table constructor, method
-- call or assignment to write. So an expression reads and cannot change anything, and
-- its cost is bounded by its length and the built-ins it calls.
return function(P, math, text, proxies, ctx_module, B, compile)
  local type, pairs, next, tostring, tonumber = P.type, P.pairs, P.next, P.tostring, P.tonumber
  local rawget, rawlen, rawequal, getmetatable = P.rawget, P.rawlen, P.rawequal,
    P.getmetatable
  local error, pcall, s_sub, s_find, s_match = P.error, P.pcall, P.s_sub, P.s_find, P.s_match
  local t_unpack, m_floor = P.t_unpack, P.m_floor
  local utf8_clean = text.utf8_clean
  local master_of, lazy_ctx, peek = proxies.master_of, ctx_module.lazy_ctx, ctx_module.peek
  local MAX_TEXT = 65536  -- the longest string `..` builds

  local MAX_LENGTH, MAX_DEPTH = 1024, 64

  local QUERIES = {}
  local SIDE_EFFECTS = {
    log_debug = true, log_info = true, log_warn = true, log_error = true,
    emit_metric = true, refresh_pool_state = true, find_worker_round_robin = true,
    platform_schedule = true,
  }
  for name, fn in pairs(B) do
    if not SIDE_EFFECTS[name] then QUERIES[name] = fn end
  end
  local MATH = {}
  for _, name in pairs({ "abs", "ceil", "floor", "max", "min", "sqrt", "log", "exp", "fmod",
                          "huge", "pi", "maxinteger", "mininteger" }) do
    MATH[name] = math[name]
  end
  local FUNCTIONS = { type = type, tonumber = tonumber }

  ------------------------------------------------------------------ tokens
  local KEYWORDS = {}
  for _, w in pairs({ "and", "break", "do", "else", "elseif", "end", "false", "for",
                      "function", "goto", "if", "in", "local", "nil", "not", "or", "repeat",
                      "return", "then", "true", "until", "while" }) do
    KEYWORDS[w] = true
  end
  local OPERATORS = {
    ["+"] = true, ["-"] = true, ["*"] = true, ["/"] = true, ["//"] = true, ["%"] = true,
    ["^"] = true, ["#"] = true, ["=="] = true, ["~="] = true, ["<"] = true, ["<="] = true,
    [">"] = true, [">="] = true, [".."] = true, ["("] = true, [")"] = true, ["["] = true,
    ["]"] = true, ["."] = true, [","] = true,
  }
  local REFUSED = {
    [":"] = "no method calls", ["{"] = "no table constructors", ["="] = "no assignment",
    ["function"] = "no function definitions",
  }

  local function literal(source)
    -- A string literal's value: Lua's own compiler reads its escapes. A literal is
    -- data, so the chunk runs no code, in an empty environment.
    local chunk = compile("return " .. source, "=literal", {})
    if not chunk then error("a malformed string", 0) end
    return chunk()
  end

  local function tokenize(expr)
    local tokens, i, n = {}, 1, #expr
    while i <= n do
      local c = s_sub(expr, i, i)
      if s_find(c, "^%s") then
        i = i + 1
      elseif s_find(expr, "^%-%-", i) then
        local level = s_match(expr, "^%-%-%[(=*)%[", i)
        if level then
          local _, close = s_find(expr, "]" .. level .. "]", i, true)
          if not close then error("an unfinished comment", 0) end
          i = close + 1
        else
          local newline = s_find(expr, "\n", i, true)
          i = newline and newline + 1 or n + 1
        end
      elseif s_find(c, "^[%a_]") then
        local word = s_match(expr, "^[%w_]+", i)
        if REFUSED[word] then error(REFUSED[word], 0) end
        tokens[#tokens + 1] = KEYWORDS[word] and { word } or { "name", word }
        i = i + #word
      elseif s_find(c, "^%d") or s_find(expr, "^%.%d", i) then
        local number = s_match(expr, "^0[xX][%x%.]*[pP][%+%-]?%d+", i)
          or s_match(expr, "^0[xX][%x%.]*", i) or s_match(expr, "^[%d%.]+[eE][%+%-]?%d+", i)
          or s_match(expr, "^[%d%.]+", i)
        local value = tonumber(number)
        if value == nil then error("a malformed number: " .. number, 0) end
        tokens[#tokens + 1] = { "value", value }
        i = i + #number
      elseif c == '"' or c == "'" then
        local j = i + 1
        while true do
          local ch = s_sub(expr, j, j)
          if ch == "" or ch == "\n" then error("an unfinished string", 0) end
          if ch == "\\" then j = j + 2
          elseif ch == c then break
          else j = j + 1 end
        end
        tokens[#tokens + 1] = { "value", literal(s_sub(expr, i, j)) }
        i = j + 1
      elseif s_find(expr, "^%[=*%[", i) then
        local level = s_match(expr, "^%[(=*)%[", i)
        local _, close = s_find(expr, "]" .. level .. "]", i, true)
        if not close then error("an unfinished string", 0) end
        tokens[#tokens + 1] = { "value", literal(s_sub(expr, i, close)) }
        i = close + 1
      else
        local op = s_match(expr, "^%.%.%.", i) or s_match(expr, "^%.%.", i)
          or s_match(expr, "^[=~<>]=", i) or s_match(expr, "^//", i) or c
        if REFUSED[op] then error(REFUSED[op], 0) end
        if not OPERATORS[op] then error("'" .. op .. "' is not supported here", 0) end
        tokens[#tokens + 1] = { op }
        i = i + #op
      end
    end
    return tokens
  end

  ------------------------------------------------------------------ parsing
  -- Binary operators: left and right priority (Lua's own, section 3.4.8).
  local BINARY = {
    ["or"] = { 1, 1 }, ["and"] = { 2, 2 },
    ["<"] = { 3, 3 }, [">"] = { 3, 3 }, ["<="] = { 3, 3 }, [">="] = { 3, 3 },
    ["~="] = { 3, 3 }, ["=="] = { 3, 3 },
    [".."] = { 9, 8 }, ["+"] = { 10, 10 }, ["-"] = { 10, 10 },
    ["*"] = { 11, 11 }, ["/"] = { 11, 11 }, ["//"] = { 11, 11 }, ["%"] = { 11, 11 },
    ["^"] = { 14, 13 },
  }
  local UNARY = { ["not"] = true, ["-"] = true, ["#"] = true }
  local UNARY_PRIORITY = 12

  local function parse(expr)
    if type(expr) ~= "string" or #expr == 0 or #expr > MAX_LENGTH then
      error("an expression is 1 to " .. MAX_LENGTH .. " characters", 0)
    end
    local tokens, at, depth = tokenize(expr), 1, 0
    local function peek() local t = tokens[at] return t and t[1] end
    local function take(kind)
      local t = tokens[at]
      if t == nil or (kind and t[1] ~= kind) then
        error("expected " .. (kind or "more") .. (t and (" near '" .. tostring(t[2] or t[1]) .. "'")
          or " at the end"), 0)
      end
      at = at + 1
      return t
    end

    local expression
    local function arguments()
      local args = {}
      if peek() ~= ")" then
        repeat args[#args + 1] = expression(0) until peek() ~= "," or not take(",")
      end
      take(")")
      return args
    end

    local function primary()
      local t = take()
      local node
      if t[1] == "name" then node = { "name", t[2] }
      elseif t[1] == "(" then node = { "group", expression(0) } take(")")
      else error("unexpected '" .. tostring(t[2] or t[1]) .. "'", 0) end
      while true do
        local k = peek()
        if k == "." then
          take(".")
          node = { "index", node, { "value", take("name")[2] } }
        elseif k == "[" then
          take("[")
          node = { "index", node, expression(0) }
          take("]")
        elseif k == "(" then
          take("(")
          node = { "call", node, arguments() }
        elseif k == "value" and type(tokens[at][2]) == "string" then
          error("call with parentheses", 0)
        else
          return node
        end
      end
    end

    local function simple()
      local k = peek()
      if k == "value" then return { "value", take()[2] } end
      if k == "nil" then take() return { "value", nil } end
      if k == "true" or k == "false" then take() return { "value", k == "true" } end
      if k == "..." then error("no varargs", 0) end
      return primary()
    end

    expression = function(limit)
      depth = depth + 1
      if depth > MAX_DEPTH then error("the expression nests too deep", 0) end
      local node
      local k = peek()
      if UNARY[k] then
        take()
        node = { "unary", k, expression(UNARY_PRIORITY) }
      else
        node = simple()
      end
      while true do
        local op = peek()
        local priority = BINARY[op]
        if priority == nil or priority[1] <= limit then break end
        take()
        node = { "binary", op, node, expression(priority[2]) }
      end
      depth = depth - 1
      return node
    end

    local tree = expression(0)
    if at <= #tokens then error("unexpected '" .. tostring(tokens[at][2] or tokens[at][1]) .. "'", 0) end
    return tree
  end

  ------------------------------------------------------------------ evaluation
  local function is_runtime_table(v) return lazy_ctx[v] or master_of[v] ~= nil end

  -- A value a query built-in may be given: nothing through which it could run script
  -- code (a table of the script's with a metatable, or a function).
  local function plain(v, nested)
    local kind = type(v)
    if kind == "function" or kind == "thread" or kind == "userdata" then return false end
    if kind ~= "table" then return true end
    -- ctx is the script's table too (it may set any field): no query built-in takes it.
    if lazy_ctx[v] then return false end
    if master_of[v] ~= nil then return true end
    if getmetatable(v) ~= nil then return false end
    if nested then return true end
    for k, item in next, v do
      if not plain(k, true) or not plain(item, true) or
        (type(item) == "table" and not is_runtime_table(item) and getmetatable(item) ~= nil) then
        return false
      end
    end
    return true
  end

  local function read(object, key)
    if type(object) ~= "table" then error("cannot index a " .. type(object), 0) end
    if lazy_ctx[object] then return peek(object, key) end
    if master_of[object] ~= nil then return object[key] end
    return rawget(object, key)
  end

  local function number(v, op)
    if type(v) ~= "number" then error("'" .. op .. "' on a " .. type(v), 0) end
    return v
  end

  local function comparable(a, b, op)
    local ta, tb = type(a), type(b)
    if ta ~= tb or (ta ~= "number" and ta ~= "string") then
      error("'" .. op .. "' between a " .. ta .. " and a " .. tb, 0)
    end
  end

  local function text_like(v) local t = type(v) return t == "string" or t == "number" end

  local ARITHMETIC = {
    ["+"] = function(a, b) return a + b end, ["-"] = function(a, b) return a - b end,
    ["*"] = function(a, b) return a * b end, ["/"] = function(a, b) return a / b end,
    ["%"] = function(a, b) return a % b end, ["^"] = function(a, b) return a ^ b end,
    ["//"] = function(a, b) return m_floor(a / b) end,
  }

  local evaluate
  local function callee(node, lookup)
    if node[1] == "name" and FUNCTIONS[node[2]] then return FUNCTIONS[node[2]], false end
    if node[1] == "index" and node[2][1] == "name" and node[3][1] == "value" then
      local owner, name = node[2][2], node[3][2]
      if owner == "math" and type(MATH[name]) == "function" then return MATH[name], false end
      if owner == "ctx" and QUERIES[name] then
        if not lazy_ctx[lookup("ctx")] then error("ctx is not the scheduler's ctx here", 0) end
        return QUERIES[name], true
      end
    end
    error("read-only: a call may name ctx's query built-ins, math, type or tonumber only", 0)
  end

  evaluate = function(node, lookup)
    local kind = node[1]
    if kind == "value" then return node[2] end
    if kind == "name" then return lookup(node[2]) end
    if kind == "group" then return (evaluate(node[2], lookup)) end
    if kind == "index" then return read(evaluate(node[2], lookup), evaluate(node[3], lookup)) end
    if kind == "unary" then
      local v = evaluate(node[3], lookup)
      if node[2] == "not" then return not v end
      if node[2] == "-" then return -number(v, "-") end
      if type(v) == "string" then return #v end
      if type(v) ~= "table" then error("'#' on a " .. type(v), 0) end
      return is_runtime_table(v) and 0 or rawlen(v)
    end
    if kind == "binary" then
      local op = node[2]
      local a = evaluate(node[3], lookup)
      if op == "and" then if not a then return a end return evaluate(node[4], lookup) end
      if op == "or" then if a then return a end return evaluate(node[4], lookup) end
      local b = evaluate(node[4], lookup)
      if op == "==" then return rawequal(a, b) end
      if op == "~=" then return not rawequal(a, b) end
      if op == ".." then
        if not (text_like(a) and text_like(b)) then
          error("'..' between a " .. type(a) .. " and a " .. type(b), 0)
        end
        local size = (type(a) == "string" and #a or 32) + (type(b) == "string" and #b or 32)
        if size > MAX_TEXT then error("'..' makes at most " .. MAX_TEXT .. " bytes here", 0) end
        return a .. b
      end
      if ARITHMETIC[op] then return ARITHMETIC[op](number(a, op), number(b, op)) end
      comparable(a, b, op)
      if op == "<" then return a < b end
      if op == "<=" then return a <= b end
      if op == ">" then return a > b end
      return a >= b
    end
    -- a call
    local fn, query = callee(node[2], lookup)
    local args = {}
    for i, arg in pairs(node[3]) do
      local v = evaluate(arg, lookup)
      if not plain(v) then error("argument " .. i .. " holds a function or a metatable", 0) end
      args[i] = v
    end
    if not query then
      for i = 1, #node[3] do
        local t = type(args[i])
        if t ~= "number" and t ~= "string" and t ~= "nil" and t ~= "boolean" then
          error("math, type and tonumber take plain values here", 0)
        end
      end
    end
    return (fn(t_unpack(args, 1, #node[3])))
  end

  -- Parses `expr`; returns the tree, or nil and why not.
  local function compile_expression(expr)
    local ok, tree = pcall(parse, expr)
    if not ok then return nil, "read-only expression: " .. utf8_clean(tostring(tree)) end
    return tree
  end

  -- Runs a tree; `lookup(name)` gives a name's value. Returns ok, value or message.
  local function run(tree, lookup)
    local ok, value = pcall(evaluate, tree, lookup)
    if ok then return true, value end
    if type(value) ~= "string" then value = "the expression failed" end
    return false, utf8_clean(value)
  end

  return { compile = compile_expression, run = run }
end
