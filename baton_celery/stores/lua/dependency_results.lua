-- The results of a step's completed dependencies. Runs after the field positions only.
-- KEYS[1] = the meta key; ARGV[1] = the prefix of its other keys; ARGV[2] = step.
local P = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if redis.call('EXISTS', P .. 's:' .. ARGV[2]) == 0 then return {'nostep'} end
local deps = redis.call('HGET', P .. 'deps', ARGV[2])
local out = {}
for _, dep in ipairs(deps and cjson.decode(deps) or {}) do
  if redis.call('HGET', P .. 's:' .. dep, 'state') == 'completed' then
    out[#out + 1] = {dep, redis.call('HGET', P .. 'res', dep)}
  end
end
return {'ok', out}
