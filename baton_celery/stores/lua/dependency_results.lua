-- The results of a step's completed dependencies. ARGV[6] = step.
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
local out = {}
for _, dep in ipairs(cjson.decode(heavy(v)[DEPS])) do
  local d = redis.call('HMGET', skey(dep), 'state', 'res')
  if d[1] == 'completed' then out[#out + 1] = {dep, d[2]} end
end
return cjson.encode({'ok', out})
