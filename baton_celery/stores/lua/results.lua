-- The state and result of some steps. ARGV[6..] = step names.
local out = {}
for i = 6, #ARGV do
  out[#out + 1] = redis.call('HMGET', skey(ARGV[i]), 'state', 'hasres', 'res')
end
return {'ok', out}
