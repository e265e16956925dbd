-- A step's message is about to run (task_prerun): run it, snooze it, or skip it.
-- ARGV[7] = step, ARGV[8] = the dispatch number the message carries.
local dispatch = tonumber(ARGV[8])
local v = get(ARGV[7])
if not v then return {'nostep'} end
if TERMINAL[v[STATE]] or dispatch < tonumber(v[DISP]) then return unchanged('skip', v) end

local function cancel_at_gate(err, origin)
  terminate(v, 'cancelled', err, origin)
  propagate(v)
  claim()
  return commit('skip', v)
end

if W.cancel then return cancel_at_gate(WORKFLOW_CANCELLED, v.name) end
if tonumber(v[REM]) > 0 then
  -- Not released by its dependencies (a stray or early message): look at each of them.
  local deps = cjson.decode(redis.call('HGET', P .. 'deps', v.name))
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
    emit(v, 'snoozed')
    return commit('snooze', v)
  end
end
set(v, STATE, 'executing')
set(v, DISP, math.max(tonumber(v[DISP]), dispatch))
set(v, ATT, tonumber(v[ATT]) + 1)
set(v, ERR, false)
emit(v, 'executing')
return commit('run', v)
