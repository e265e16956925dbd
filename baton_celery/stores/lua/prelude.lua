-- Shared by every script but create.lua, after the generated field positions (FIELDS,
-- NAME .. RN, RECORD_FIELDS, WORKFLOW_CANCELLED: see redis_scripts.py).
--
-- KEYS[1] = the workflow's meta key; ARGV[1] = the prefix of its other keys
-- ("baton:{<id>}:"), which share its hash tag and so live on the node that runs the
-- script; ARGV[2] = now; ARGV[3] = retention in ms (< 0: keep); ARGV[4] = the global key
-- prefix ("baton:") on a single Redis, "" on a cluster (there the client updates the
-- global keys itself); ARGV[5] = the workflow id. A script's own arguments follow.
local meta, P, now, retention = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local G, wid = ARGV[4], ARGV[5]
local TERMINAL = {completed = true, discarded = true, cancelled = true}

local function skey(n) return P .. 's:' .. n end
local function snap(n) return redis.call('HMGET', skey(n), unpack(FIELDS, 1, RECORD_FIELDS)) end
-- Read with a step's small fields; the bulky ones only when needed (a fan-in step's deps
-- can be long: its parents' settles must not read them).
local HEAVY = {SIG, DEPS, RES, KIDS}
local HEAVY_NAMES, LIGHT, LIGHT_NAMES, is_heavy = {}, {}, {}, {}
for j, i in ipairs(HEAVY) do HEAVY_NAMES[j], is_heavy[i] = FIELDS[i], true end
for i = 1, #FIELDS do
  if not is_heavy[i] then
    LIGHT[#LIGHT + 1] = i
    LIGHT_NAMES[#LIGHT] = FIELDS[i]
  end
end

-- The workflow's counters, read once here and written once by flush().
local m = redis.call('HMGET', meta, 'cancel', 'label', 'seq', 'out', 'outcome', 'created', 'n')
if not m[1] then return cjson.encode({'unknown'}) end
local W = {cancel = m[1] == '1', label = m[2], seq = tonumber(m[3]), out = tonumber(m[4]),
           outcome = m[5], created = m[6], n = m[7], fin = false}

-- Steps are read once (one HMGET) into a table, changed there, and written by flush().
local cache = {}
local function get(n)
  local v = cache[n]
  if v then return v end
  local light = redis.call('HMGET', skey(n), unpack(LIGHT_NAMES))
  v = {}
  for i = 1, #LIGHT do v[LIGHT[i]] = light[i] end
  if not v[STATE] then return nil end
  v.name, v.dirty, v.had_err, v.loaded = n, {}, v[ERR] ~= false, false
  cache[n] = v
  return v
end
local function heavy(v)  -- sig, deps, res and kids, read once
  if not v.loaded then
    local h = redis.call('HMGET', skey(v.name), unpack(HEAVY_NAMES))
    for j, i in ipairs(HEAVY) do
      if i == RES then v.had_res = h[j] ~= false end
      if not v.dirty[i] then v[i] = h[j] end
    end
    v.loaded = true
  end
  return v
end
local function set(v, i, value) v[i] = value; v.dirty[i] = true end
local function snapshot(v)
  heavy(v)
  local out = {}
  for i = 1, RECORD_FIELDS do out[i] = v[i] end
  return out
end

local function flush()
  for n, v in pairs(cache) do
    local args, dels = {}, {}
    for i in pairs(v.dirty) do
      if v[i] then
        args[#args + 1] = FIELDS[i]
        args[#args + 1] = v[i]
      elseif (i == ERR and v.had_err) or (i == RES and v.had_res) then
        dels[#dels + 1] = FIELDS[i]
      end
    end
    if #args > 0 then redis.call('HSET', skey(n), unpack(args)) end
    if #dels > 0 then redis.call('HDEL', skey(n), unpack(dels)) end
  end
  local args = {'seq', W.seq, 'out', W.out}
  if W.cancel then args[#args + 1] = 'cancel'; args[#args + 1] = '1' end
  if W.fin then
    args[#args + 1] = 'outcome'; args[#args + 1] = W.outcome
    args[#args + 1] = 'fin'; args[#args + 1] = W.fin
  end
  redis.call('HSET', meta, unpack(args))
end

local function stamp(v)
  W.seq = W.seq + 1
  set(v, SEQ, W.seq)
  set(v, UPD, now)
end

local function tolerates(v, state)
  return state == 'completed' or (state == 'cancelled' and v[IC] == '1')
    or (state == 'discarded' and v[ID] == '1')
end

-- records._cascade_reason; 'rn' is the Python repr() of a step's name.
local function reason(dep)
  local origin = 'None'
  if dep[ORIG] then origin = get(dep[ORIG])[RN] end
  return 'dependency ' .. dep[RN] .. ' was ' .. dep[STATE] .. ' (failure began at ' .. origin .. ')'
end

-- A step reaches a terminal state: one less outstanding, remember it if it failed.
local function terminate(v, state, err, origin)
  set(v, STATE, state)
  set(v, ERR, err or false)
  if origin then set(v, ORIG, origin) end
  W.out = W.out - 1
  if state ~= 'completed' then redis.call('ZADD', P .. 'failed', v[IDX], v.name) end
  stamp(v)
end

-- records._propagate: release or cancel the dependents of a settled step, transitively.
local function propagate(first, released, cancelled)
  local stack = {first}
  while #stack > 0 do
    local dep = table.remove(stack)
    local kids = cjson.decode(heavy(dep)[KIDS])
    for i = 1, #kids do
      local c = get(kids[i])
      if c[STATE] == 'pending' and tonumber(c[DISP]) == 0 then
        local err, origin = nil, nil
        if not tolerates(c, dep[STATE]) then
          err, origin = reason(dep), dep[ORIG] or c.name
        else
          set(c, REM, tonumber(c[REM]) - 1)
          if c[REM] > 0 then
            -- still waiting for another dependency
          elseif W.cancel then
            err, origin = WORKFLOW_CANCELLED, c.name
          else
            set(c, DISP, 1)
            set(c, UPD, now)
            released[#released + 1] = c
          end
        end
        if err then
          terminate(c, 'cancelled', err, origin)
          cancelled[#cancelled + 1] = c
          stack[#stack + 1] = c
        end
      end
    end
  end
end

-- records._claim_finish: won by the transition that settles the last outstanding step.
local function claim()
  if W.outcome or W.out > 0 then return false end
  local failed = redis.call('ZRANGE', P .. 'failed', 0, -1)
  W.outcome = 'completed'
  if #failed > 0 then W.outcome = 'failed' end
  W.seq = W.seq + 1
  W.fin = now
  return {W.outcome, failed, W.n, W.created, now, W.seq}
end

-- Once finished, every key of the workflow lives for the retention.
local function expire_all(finish)
  local jobs = redis.call('LRANGE', P .. 'jobs', 0, -1)
  if retention >= 0 then
    local names = redis.call('LRANGE', P .. 'steps', 0, -1)
    for i = 1, #names do redis.call('PEXPIRE', skey(names[i]), retention) end
    for _, k in ipairs({meta, P .. 'steps', P .. 'jobs', P .. 'failed'}) do
      redis.call('PEXPIRE', k, retention)
    end
  end
  if G ~= '' then
    redis.call('ZREM', G .. 'live', wid)
    if retention >= 0 then
      for i = 1, #jobs do redis.call('PEXPIRE', G .. 'job:' .. jobs[i], retention) end
    end
    jobs = {}
  end
  finish[#finish + 1] = jobs
end

-- Commit, then what a transition did, for the caller: records.Transition.
local function settlement(applied, v, released, cancelled, finish)
  flush()
  if finish then expire_all(finish) end
  local r, c = {}, {}
  for i = 1, #released do r[i] = snapshot(released[i]) end
  for i = 1, #cancelled do c[i] = snapshot(cancelled[i]) end
  return {applied, v and snapshot(v) or false, r, c, finish, W.label or false}
end
-- A transition about one step alone (nothing released, cancelled or finished).
local function only(applied, v)
  return {applied, snapshot(v), {}, {}, false, W.label or false}
end
