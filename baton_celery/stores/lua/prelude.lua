-- Shared by the transitions (begin, retrying, settle, cancel), after the generated field
-- positions (FIELDS, STATE .. RN, WORKFLOW_CANCELLED: see redis_scripts.py).
--
-- KEYS[1] = the workflow's meta key. ARGV[1] = the prefix of its other keys
-- ("baton:{<id>}:"), which share its hash tag and so live on the node that runs the
-- script; ARGV[2] = the global key prefix ("baton:") on a single Redis, "" on a cluster
-- (there the client updates the global keys itself); ARGV[3] = the workflow id;
-- ARGV[4] = retention in ms (< 0: keep); ARGV[5] = the channel to publish the events on
-- ("" : none); ARGV[6] = the caller's process token (in what is published). A script's
-- own arguments follow.
--
-- Time is the Redis server's: one clock for every host, and a workflow's events are
-- never stamped earlier than its latest one.
local meta, P, G, wid = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local retention, channel, origin = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local TERMINAL = {completed = true, discarded = true, cancelled = true}

local m = redis.call('HMGET', meta, 'cancel', 'label', 'seq', 'out', 'outcome', 'created', 'n',
                     'upd', 'elim')
if not m[1] then return {'unknown'} end
local W = {cancel = m[1] == '1', label = m[2], seq = tonumber(m[3]), out = tonumber(m[4]),
           outcome = m[5], created = m[6], n = m[7], elim = tonumber(m[9]) or 2000}
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
-- records.WorkflowRecord.tick: never before the workflow's latest event, nor its creation
-- (the creating client's clock may be ahead of this server's).
local FLOOR = math.max(tonumber(m[8]) or 0, tonumber(m[6]))
if now < FLOOR then now = FLOOR end
local NOW = string.format('%.6f', now)

local function skey(n) return P .. 's:' .. n end

-- A step's small fields, read once into a table (by position), changed there and
-- written back by commit(): only the fields that changed.
local cache = {}
local function get(n)
  local v = cache[n]
  if v then return v end
  local values = redis.call('HMGET', skey(n), unpack(FIELDS))
  if not values[STATE] then return nil end
  v = {name = n, dirty = {}}
  for i = 1, #FIELDS do v[i] = values[i] end
  cache[n] = v
  return v
end
local function set(v, i, value)
  if v[i] ~= value then v[i] = value; v.dirty[i] = true end
end

local events = {}  -- encoded, in order: the history's entries, the reply's, the channel's
local released, revoke = {}, {}

-- records.step_event: one JSON array per event ("s": a step's; "f": the finish), stamped
-- NOW unless ``at`` says when it happened (run.lua's executing event).
local function emit(v, state, at)
  W.seq = W.seq + 1
  set(v, SEQ, W.seq)
  set(v, UPD, NOW)
  events[#events + 1] = cjson.encode({'s', W.seq, at or NOW, v.name, state, tonumber(v[ATT]),
                                      v[HASRES] == '1', v[ERR] or false, v[TASK], v[JOB]})
end

local function tolerates(v, state)
  return state == 'completed' or (state == 'cancelled' and v[IC] == '1')
    or (state == 'discarded' and v[ID] == '1')
end

-- The first ``limit`` characters of UTF-8 ``s`` (continuation bytes are not counted).
local function cut(s, limit)
  local chars = select(2, string.gsub(s, '[^\128-\191]', ''))
  if chars <= limit then return s end
  local keep, count, i = limit - 14, 0, 1
  while i <= #s do
    local b = string.byte(s, i)
    if b < 128 or b >= 192 then
      if count == keep then break end
      count = count + 1
    end
    i = i + 1
  end
  return string.sub(s, 1, i - 1) .. '\226\128\166 [truncated]'
end

-- records._cascade_reason; 'rn' is the Python repr() of a step's name.
local function reason(dep)
  local origin = 'None'
  if dep[ORIG] then origin = get(dep[ORIG])[RN] end
  local text = 'dependency ' .. dep[RN] .. ' was ' .. dep[STATE] .. ' (failure began at ' ..
    origin .. ')'
  return cut(text, W.elim)
end

-- A step reaches a terminal state: one less outstanding, remember it if it failed.
local function terminate(v, state, err, origin)
  set(v, STATE, state)
  set(v, ERR, err or false)
  if origin then set(v, ORIG, origin) end
  W.out = W.out - 1
  if state ~= 'completed' then redis.call('ZADD', P .. 'failed', v[IDX], v.name) end
  emit(v, state)
end

-- records._propagate: release or cancel the dependents of a settled step, transitively.
local function propagate(first)
  local stack = {first}
  while #stack > 0 do
    local dep = table.remove(stack)
    local kids = {}
    if dep[HASKIDS] == '1' then kids = cjson.decode(redis.call('HGET', P .. 'kids', dep.name)) end
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
            set(c, UPD, NOW)
            released[#released + 1] = c
          end
        end
        if err then
          terminate(c, 'cancelled', err, origin)
          stack[#stack + 1] = c
        end
      end
    end
  end
end

-- records._claim_finish: won by the transition that settles the last outstanding step.
local finish = false
local function claim()
  if W.outcome or W.out > 0 then return end
  local failed = redis.call('ZRANGE', P .. 'failed', 0, -1)
  W.outcome = 'completed'
  if #failed > 0 then W.outcome = 'failed' end
  W.seq = W.seq + 1
  W.fin = NOW
  local list = '[]'
  if #failed > 0 then list = cjson.encode(failed) end
  events[#events + 1] = '["f",' .. W.seq .. ',"' .. NOW .. '","' .. W.outcome .. '",' ..
    list .. ']'
  finish = {W.n, W.created, NOW}
end

-- Once finished, every key of the workflow lives for the retention.
local function expire_all()
  local jobs = redis.call('LRANGE', P .. 'jobs', 0, -1)
  if retention >= 0 then
    local names = redis.call('LRANGE', P .. 'steps', 0, -1)
    for i = 1, #names do redis.call('PEXPIRE', skey(names[i]), retention) end
    for _, k in ipairs({'steps', 'jobs', 'failed', 'ev', 'sig', 'deps', 'kids', 'res', 'ann'}) do
      redis.call('PEXPIRE', P .. k, retention)
    end
    redis.call('PEXPIRE', meta, retention)
  end
  if G ~= '' then
    redis.call('ZREM', G .. 'live', wid)
    redis.call('ZADD', G .. 'done', now, wid)
    if retention >= 0 then
      for i = 1, #jobs do redis.call('PEXPIRE', G .. 'job:' .. jobs[i], retention) end
      -- The index forgets the workflows that expired (a bounded number at a time).
      local gone = redis.call('ZRANGEBYSCORE', G .. 'done', '-inf', now - retention / 1000,
                              'LIMIT', 0, 100)
      if #gone > 0 then
        redis.call('ZREM', G .. 'done', unpack(gone))
        redis.call('ZREM', G .. 'index', unpack(gone))
      end
    end
    jobs = {}
  end
  finish[#finish + 1] = jobs
end

-- Commit: the changed fields, the counters, the history; publish; then the reply
-- (records.Transition): status, applied, events, released steps (name, job, signature,
-- dispatch, whether it has dependents), job ids to revoke, finish ({total, created, finished, [jobs]} or false),
-- the step's dispatch number (``gated``: the step a begin gated), the workflow's label.
local function commit(status, gated)
  for n, s in pairs(cache) do
    local args = {}
    local dels = {}
    for i in pairs(s.dirty) do
      if s[i] then
        args[#args + 1] = FIELDS[i]
        args[#args + 1] = s[i]
      else
        dels[#dels + 1] = FIELDS[i]
      end
    end
    if #args > 0 then redis.call('HSET', skey(n), unpack(args)) end
    if #dels > 0 then redis.call('HDEL', skey(n), unpack(dels)) end
  end
  local args = {'seq', W.seq, 'out', W.out, 'upd', NOW}
  if W.cancel then args[#args + 1] = 'cancel'; args[#args + 1] = '1' end
  if W.fin then
    args[#args + 1] = 'outcome'; args[#args + 1] = W.outcome
    args[#args + 1] = 'fin'; args[#args + 1] = W.fin
  end
  redis.call('HSET', meta, unpack(args))
  if #events > 0 then redis.call('RPUSH', P .. 'ev', unpack(events)) end
  if finish then expire_all() end
  if channel ~= '' and #events > 0 then
    redis.call('PUBLISH', channel, cjson.encode({wid, W.label or false, origin}) .. '\n' ..
      table.concat(events, '\n'))
  end
  local r = {}
  if #released > 0 then
    local sigs = {}
    for i = 1, #released do sigs[i] = released[i].name end
    sigs = redis.call('HMGET', P .. 'sig', unpack(sigs))
    for i = 1, #released do
      local c = released[i]
      r[i] = {c.name, c[JOB], sigs[i], c[DISP], c[HASKIDS]}
    end
  end
  return {status, 1, events, r, revoke, finish, gated and gated[DISP] or 0, W.label or false}
end

-- A transition that changed nothing.
local function unchanged(status, gated)
  return {status, 0, {}, {}, {}, false, gated and gated[DISP] or 0, W.label or false}
end

-- begin.lua and run.lua: a step's message is about to run (or ran without asking): run it
-- (nil: the step is executing now, its event stamped ``at``), or the reply that snoozes
-- or skips it.
local function gate(v, dispatch, at)
  if TERMINAL[v[STATE]] or dispatch < tonumber(v[DISP]) then return unchanged('skip', v) end
  local function cancel_at_gate(err, origin)
    terminate(v, 'cancelled', err, origin)
    propagate(v)
    claim()
    return commit('skip', v)
  end
  if W.cancel then return cancel_at_gate(WORKFLOW_CANCELLED, v.name) end
  if tonumber(v[REM]) > 0 then
    -- Not released by its dependencies (a stray or early message): look at each of them.
    local deps = cjson.decode(redis.call('HGET', P .. 'deps', v.name))
    local ready = true
    for i = 1, #deps do
      local d = get(deps[i])
      if not TERMINAL[d[STATE]] then
        ready = false
      elseif not tolerates(v, d[STATE]) then
        return cancel_at_gate(reason(d), d[ORIG] or v.name)
      end
    end
    if not ready then
      emit(v, 'snoozed')
      return commit('snooze', v)
    end
  end
  set(v, STATE, 'executing')
  set(v, DISP, math.max(tonumber(v[DISP]), dispatch))
  set(v, ATT, tonumber(v[ATT]) + 1)
  set(v, ERR, false)
  emit(v, 'executing', at)
  return nil
end

-- settle.lua and run.lua: step ``v`` reaches a terminal state; its dependents are released
-- or cancelled. ARGV[8] = state, [9] = has_result "1"/"0", [10] = "1" when a result
-- follows, [11] = result JSON, [12] = "1" when an error follows, [13] = error.
local function settle(v)
  local state = ARGV[8]
  if v[HASRES] ~= ARGV[9] then set(v, HASRES, ARGV[9]) end
  if ARGV[10] == '1' then redis.call('HSET', P .. 'res', v.name, ARGV[11]) end
  local origin = nil
  if state ~= 'completed' then origin = v.name end
  terminate(v, state, ARGV[12] == '1' and ARGV[13], origin)
  propagate(v)
  claim()
end
