-- A step reaches a terminal state; its dependents are released or cancelled.
-- ARGV[7] = step, [8] = state, [9] = has_result "1"/"0", [10] = "1" when a result follows,
-- [11] = result JSON, [12] = "1" when an error follows, [13] = error,
-- [14] = the seq the step must still have ("" for any: the backstop passes one).
local state = ARGV[8]
local v = get(ARGV[7])
if not v then return {'nostep'} end
if TERMINAL[v[STATE]] or (ARGV[14] ~= '' and tostring(v[SEQ]) ~= ARGV[14]) then
  return unchanged('ok', nil)
end
if v[HASRES] ~= ARGV[9] then set(v, HASRES, ARGV[9]) end
if ARGV[10] == '1' then redis.call('HSET', P .. 'res', v.name, ARGV[11]) end
local origin = nil
if state ~= 'completed' then origin = v.name end
terminate(v, state, ARGV[12] == '1' and ARGV[13], origin)
propagate(v)
claim()
return commit('ok', nil)
