-- Keep small strings with a workflow, expiring with it. Runs alone.
-- KEYS[1] = the meta key; ARGV[1] = the prefix of its other keys; ARGV[2..] = key/value pairs.
local P = ARGV[1]
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
redis.call('HSET', P .. 'ann', unpack(ARGV, 2))
if ttl >= 0 then redis.call('PEXPIRE', P .. 'ann', ttl) end
return 1
