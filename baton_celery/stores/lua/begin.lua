-- A step's message arrives (task_prerun): run it, snooze it, or skip it.
-- ARGV[6] = step, ARGV[7] = the dispatch number the message carries.
local dispatch = tonumber(ARGV[7])
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
if TERMINAL[v[STATE]] or dispatch < tonumber(v[DISP]) then
  return cjson.encode({'skip', only(0, v)})
end

local function cancel_at_gate(err, origin)
  local released, cancelled = {}, {}
  terminate(v, 'cancelled', err, origin)
  propagate(v, released, cancelled)
  return cjson.encode({'skip', settlement(1, v, released, cancelled, claim())})
end

if W.cancel then return cancel_at_gate(WORKFLOW_CANCELLED, v.name) end
if tonumber(v[REM]) > 0 then
  -- Not released by its dependencies (a stray or early message): look at each of them.
  local deps = cjson.decode(heavy(v)[DEPS])
  local ready = true
  for i = 1, #deps do
    local d = get(deps[i])
    if not TERMINAL[d[STATE]] then
      ready = false
    elseif not tolerates(v, d[STATE]) then
      return cancel_at_gate(reason(d), d[ORIG] or v.name)
    end
  end
  if not ready then
    stamp(v)
    flush()
    return cjson.encode({'snooze', only(1, v)})
  end
end
set(v, STATE, 'executing')
set(v, DISP, math.max(tonumber(v[DISP]), dispatch))
set(v, ATT, tonumber(v[ATT]) + 1)
set(v, ERR, false)
stamp(v)
flush()
return cjson.encode({'run', only(1, v)})
