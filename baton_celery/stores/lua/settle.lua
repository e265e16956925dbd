-- A step reaches a terminal state; its dependents are released or cancelled.
-- ARGV[6] = step, [7] = state, [8] = has_result "1"/"0", [9] = "1" when a result follows,
-- [10] = result JSON, [11] = "1" when an error follows, [12] = error,
-- [13] = the seq the step must still have ("" for any: the backstop passes one).
local state = ARGV[7]
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
if TERMINAL[v[STATE]] or (ARGV[13] ~= '' and tostring(v[SEQ]) ~= ARGV[13]) then
  return cjson.encode({'ok', only(0, v)})
end
heavy(v)
set(v, HASRES, ARGV[8])
set(v, RES, ARGV[9] == '1' and ARGV[10])
local origin = nil
if state ~= 'completed' then origin = v.name end
terminate(v, state, ARGV[11] == '1' and ARGV[12], origin)
local released, cancelled = {}, {}
propagate(v, released, cancelled)
return cjson.encode({'ok', settlement(1, v, released, cancelled, claim())})
