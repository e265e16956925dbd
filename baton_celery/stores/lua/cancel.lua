-- The workflow is cancelled: every pending step is, at once.
if W.outcome or W.cancel then
  return cjson.encode({'ok', {0, false, {}, {}, false, W.label or false}})
end
W.cancel = true
local cancelled = {}
local names = redis.call('LRANGE', P .. 'steps', 0, -1)
for i = 1, #names do
  local v = get(names[i])
  if v[STATE] == 'pending' then
    terminate(v, 'cancelled', WORKFLOW_CANCELLED, v.name)
    cancelled[#cancelled + 1] = v
  end
end
return cjson.encode({'ok', settlement(1, false, {}, cancelled, claim())})
