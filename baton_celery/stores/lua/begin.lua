-- A step's message is about to run (task_prerun): run it, snooze it, or skip it.
-- ARGV[7] = step, ARGV[8] = the dispatch number the message carries.
local v = get(ARGV[7])
if not v then return {'nostep'} end
return gate(v, tonumber(ARGV[8])) or commit('run', v)
