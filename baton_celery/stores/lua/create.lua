-- A new workflow, whole; 0 when it exists already. Runs without the prelude.
-- KEYS[1] = its meta key; ARGV[1] = the prefix of its other keys, ARGV[4] = the global key
-- prefix ("" on a cluster), ARGV[5] = workflow id, ARGV[6] = created (the live index's
-- score), ARGV[7] = the meta hash as a JSON list of strings, ARGV[8..] = one JSON list per
-- step: name, job, then field/value pairs.
local meta, P, G = KEYS[1], ARGV[1], ARGV[4]
if redis.call('EXISTS', meta) == 1 then return 0 end
redis.call('HSET', meta, unpack(cjson.decode(ARGV[7])))
local names, jobs = {}, {}
for i = 8, #ARGV do
  local step = cjson.decode(ARGV[i])
  redis.call('HSET', P .. 's:' .. step[1], unpack(step, 3))
  names[#names + 1] = step[1]
  jobs[#jobs + 1] = step[2]
end
for i = 1, #names, 1000 do
  local last = math.min(i + 999, #names)
  redis.call('RPUSH', P .. 'steps', unpack(names, i, last))
  redis.call('RPUSH', P .. 'jobs', unpack(jobs, i, last))
end
if G ~= '' then
  redis.call('ZADD', G .. 'live', 'NX', ARGV[6], ARGV[5])
  for i = 1, #names do
    redis.call('SET', G .. 'job:' .. jobs[i], cjson.encode({ARGV[5], names[i]}))
  end
end
return 1
