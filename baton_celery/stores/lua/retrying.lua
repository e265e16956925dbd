-- An executing step will be retried.
-- ARGV[7] = step, ARGV[8] = "1" when an error follows, ARGV[9] = error.
local v = get(ARGV[7])
if not v then return {'nostep'} end
if v[STATE] ~= 'executing' then return unchanged('ok', nil) end
set(v, STATE, 'retryable')
set(v, ERR, ARGV[8] == '1' and ARGV[9])
emit(v, 'retryable')
return commit('ok', nil)
