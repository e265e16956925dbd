-- The workflow is cancelled: every pending step is, at once; the queued ones' job ids
-- come back for the caller to revoke.
if W.outcome or W.cancel then return unchanged('ok', nil) end
W.cancel = true
local names = redis.call('LRANGE', P .. 'steps', 0, -1)
for i = 1, #names do
  local v = get(names[i])
  if v[STATE] == 'pending' then
    terminate(v, 'cancelled', WORKFLOW_CANCELLED, v.name)
    if tonumber(v[DISP]) > 0 then revoke[#revoke + 1] = v[JOB] end
  end
end
claim()
return commit('ok', nil)
