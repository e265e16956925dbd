-- A step reaches a terminal state; its dependents are released or cancelled.
-- ARGV[7] = step, [8] .. [13]: see settle() in the prelude; [14] = the seq the step must
-- still have ("" for any: the backstop passes one).
local v = get(ARGV[7])
if not v then return {'nostep'} end
if TERMINAL[v[STATE]] or (ARGV[14] ~= '' and tostring(v[SEQ]) ~= ARGV[14]) then
  return unchanged('ok', nil)
end
settle(v)
return commit('ok', nil)
