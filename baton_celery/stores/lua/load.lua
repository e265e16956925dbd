-- The whole workflow: its meta hash, and every step in the order they were added (its
-- small fields, signature, dependencies and result). Runs after the field positions only.
-- KEYS[1] = the meta key; ARGV[1] = the prefix of its other keys.
local meta, P = KEYS[1], ARGV[1]
local m = redis.call('HGETALL', meta)
if #m == 0 then return {'unknown'} end
local names = redis.call('LRANGE', P .. 'steps', 0, -1)
local steps = {}
for i = 1, #names do steps[i] = redis.call('HMGET', P .. 's:' .. names[i], unpack(FIELDS)) end
-- A field of every step, in order (HMGET in chunks: unpack() of a long table overflows).
local function each(key)
  local out = {}
  for i = 1, #names, 1000 do
    local part = redis.call('HMGET', P .. key, unpack(names, i, math.min(i + 999, #names)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end
return {'ok', m, names, steps, each('sig'), each('deps'), each('res')}
