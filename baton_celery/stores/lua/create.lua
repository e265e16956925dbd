-- A new workflow, whole; 0 when it exists already. Runs after the field positions only.
-- KEYS[1] = its meta key; ARGV[1] = the prefix of its other keys, ARGV[2] = the global key
-- prefix ("" on a cluster), ARGV[3] = workflow id, ARGV[4] = created (the indexes'
-- score), ARGV[5] = the meta hash as a JSON list of strings, ARGV[6..] = one JSON list per
-- step: name, job, signature, deps ("" for none), dependents ("" for none), result (""
-- for none), then the step hash's field/value pairs.
local meta, P, G, wid = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', meta) == 1 then return 0 end
redis.call('HSET', meta, unpack(cjson.decode(ARGV[5])))
local names, jobs, sigs, deps, kids, res = {}, {}, {}, {}, {}, {}
for i = 6, #ARGV do
  local step = cjson.decode(ARGV[i])
  redis.call('HSET', P .. 's:' .. step[1], unpack(step, 7))
  names[#names + 1] = step[1]
  jobs[#jobs + 1] = step[2]
  sigs[#sigs + 1] = step[1]; sigs[#sigs + 1] = step[3]
  if step[4] ~= '' then deps[#deps + 1] = step[1]; deps[#deps + 1] = step[4] end
  if step[5] ~= '' then kids[#kids + 1] = step[1]; kids[#kids + 1] = step[5] end
  if step[6] ~= '' then res[#res + 1] = step[1]; res[#res + 1] = step[6] end
end
-- In chunks: unpack() of a very long table overflows Lua's stack.
local function chunked(command, key, values, size)
  for i = 1, #values, size do
    redis.call(command, key, unpack(values, i, math.min(i + size - 1, #values)))
  end
end
chunked('RPUSH', P .. 'steps', names, 1000)
chunked('RPUSH', P .. 'jobs', jobs, 1000)
chunked('HSET', P .. 'sig', sigs, 1000)
chunked('HSET', P .. 'deps', deps, 1000)
chunked('HSET', P .. 'kids', kids, 1000)
chunked('HSET', P .. 'res', res, 1000)
if G ~= '' then
  redis.call('ZADD', G .. 'live', 'NX', ARGV[4], wid)
  redis.call('ZADD', G .. 'index', 'NX', ARGV[4], wid)
  for i = 1, #names do
    redis.call('SET', G .. 'job:' .. jobs[i], cjson.encode({wid, names[i]}))
  end
end
return 1
