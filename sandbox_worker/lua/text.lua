-- Text leaving the sandbox must be UTF-8 (the host decodes it strictly): the decision
-- reader refuses strings that are not, logs and error messages are cleaned.
return function(P)
  local type, tostring, pcall = P.type, P.tostring, P.pcall
  local s_find, s_sub, s_format, s_byte = P.s_find, P.s_sub, P.s_format, P.s_byte
  local t_concat = P.t_concat

  local function utf8_seq_len(s, i)
    local c = s_byte(s, i)
    if c < 0x80 then return 1 end
    local len
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then len = 3
    elseif c >= 0xF0 and c <= 0xF4 then len = 4
    else return nil end
    for j = i + 1, i + len - 1 do
      local cc = s_byte(s, j)
      if cc == nil or cc < 0x80 or cc > 0xBF then return nil end
    end
    local c2 = s_byte(s, i + 1)  -- overlong forms, surrogates, beyond U+10FFFF
    if (c == 0xE0 and c2 < 0xA0) or (c == 0xED and c2 > 0x9F)
      or (c == 0xF0 and c2 < 0x90) or (c == 0xF4 and c2 > 0x8F) then
      return nil
    end
    return len
  end

  local function utf8_valid(s)
    if not s_find(s, "[\128-\255]") then return true end
    local i, n = 1, #s
    while i <= n do
      local len = utf8_seq_len(s, i)
      if not len then return false end
      i = i + len
    end
    return true
  end

  -- Valid sequences are kept, other bytes shown as \xNN.
  local function utf8_clean(s)
    if utf8_valid(s) then return s end
    local out, i, n = {}, 1, #s
    while i <= n do
      local len = utf8_seq_len(s, i)
      if len then
        out[#out + 1] = s_sub(s, i, i + len - 1)
        i = i + len
      else
        out[#out + 1] = s_format("\\x%02x", s_byte(s, i))
        i = i + 1
      end
    end
    return t_concat(out)
  end

  -- Any value as clean text; a __tostring that fails or returns a non-string is not
  -- an error here.
  local function safe_tostring(value)
    local text = value
    if type(value) ~= "string" then
      local ok, result = pcall(tostring, value)
      text = (ok and type(result) == "string") and result or ("<" .. type(value) .. ">")
    end
    return utf8_clean(text)
  end

  return { utf8_valid = utf8_valid, utf8_clean = utf8_clean, safe_tostring = safe_tostring }
end
