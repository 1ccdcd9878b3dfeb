-- Built-ins of runtime-spec sections 3.3 and 4.4: the model catalog.
return function(P, B, lib, data, copies)
  local ipairs = P.ipairs
  local want, resolve = lib.want, lib.resolve
  local models, model_list = data.models, data.model_list
  local model_copy = copies.model_copy

  function B.resolve_model(model)
    want("resolve_model", 1, model, "string")
    return resolve(model)
  end

  function B.get_model(model_ref)
    want("get_model", 1, model_ref, "string")
    local model = models[resolve(model_ref)]
    return model and model_copy(model)
  end

  function B.model_exists(model_ref)
    want("model_exists", 1, model_ref, "string")
    return models[resolve(model_ref)] ~= nil
  end

  function B.filter_models(predicate)
    want("filter_models", 1, predicate, "function")
    local out = {}
    for _, ref in ipairs(model_list) do
      local model = model_copy(models[ref])
      if predicate(model) then out[#out + 1] = model end
    end
    return out
  end

  function B.find_models_by_family(family)
    want("find_models_by_family", 1, family, "string")
    local out = {}
    for _, ref in ipairs(model_list) do
      if models[ref].family == family then out[#out + 1] = model_copy(models[ref]) end
    end
    return out
  end

  function B.get_model_vram(model_ref)
    want("get_model_vram", 1, model_ref, "string")
    local model = models[resolve(model_ref)]
    return model and model.vram_required_bytes or nil
  end
end
