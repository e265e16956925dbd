-- An executing step will be retried.
-- ARGV[6] = step, ARGV[7] = "1" when an error follows, ARGV[8] = error.
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
if v[STATE] ~= 'executing' then return cjson.encode({'ok', only(0, v)}) end
set(v, STATE, 'retryable')
set(v, ERR, ARGV[7] == '1' and ARGV[8])
stamp(v)
flush()
return cjson.encode({'ok', only(1, v)})
