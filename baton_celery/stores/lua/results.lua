-- The state and result of some steps. Runs after the field positions only.
-- KEYS[1] = the meta key; ARGV[1] = the prefix of its other keys; ARGV[2..] = step names.
local P = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local out = {}
for i = 2, #ARGV do
  local s = redis.call('HMGET', P .. 's:' .. ARGV[i], 'state', 'hasres')
  out[#out + 1] = {s[1], s[2], redis.call('HGET', P .. 'res', ARGV[i])}
end
return {'ok', out}
