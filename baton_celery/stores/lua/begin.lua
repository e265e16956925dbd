-- A step's message is about to run (task_prerun): run it, snooze it, or skip it.
-- ARGV[7] = step, ARGV[8] = the dispatch number the message carries, ARGV[9] = the seconds
-- it has run already (the fast path's watchdog: its executing event is stamped that much
-- earlier, never before the workflow's latest event).
local v = get(ARGV[7])
if not v then return {'nostep'} end
local started = string.format('%.6f', math.max(now - tonumber(ARGV[9]), FLOOR))
return gate(v, tonumber(ARGV[8]), started) or commit('run', v)
