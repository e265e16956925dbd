-- A step that ran without asking the gate first (the fast path, see hooks): its begin and
-- its settle in one transition. ARGV[7] = step, [8] .. [13]: see settle() in the prelude,
-- [14] = the dispatch number its message carried, [15] = the seconds it ran (its executing
-- event is stamped that much earlier, never before the workflow's latest event).
-- The reply's status is the gate's decision: when it is not "run", nothing was settled.
local v = get(ARGV[7])
if not v then return {'nostep'} end
local started = string.format('%.6f', math.max(now - tonumber(ARGV[15]), FLOOR))
local refused = gate(v, tonumber(ARGV[14]), started)
if refused then return refused end
settle(v)
return commit('run', v)
