"""redis:// — workflows in Redis (or a Redis Cluster), shared by every worker of every host.

Every transition is one Lua script: one round trip, atomic on the server. A workflow is
not one blob but a few small keys, so a transition reads and writes only the step it is
about, the dependents it releases or cancels, and two counters::

    baton:{<workflow id>}:meta        hash: label, created, cancel, seq, out, n, outcome, fin
    baton:{<workflow id>}:steps       list: step names, in the order they were added
    baton:{<workflow id>}:jobs        list: their Celery task ids, same order
    baton:{<workflow id>}:failed      sorted set: failed steps, scored by position
    baton:{<workflow id>}:s:<step>    hash: one step (state, attempt, seq, deps, ...)
    baton:live                        sorted set: unfinished workflows by creation time
    baton:job:<task id>               string: [workflow id, step], for ``locate``

``out`` counts the steps that have not settled (the finish is claimed when it reaches 0)
and each step's ``rem`` the dependencies it still waits for (released at 0). Every key of
one workflow carries the hash tag ``{<workflow id>}``: a script never crosses a cluster
slot. The two global keys are written next to the scripts (inside them on a single Redis,
in the same call on a cluster). Once a workflow finished, all its keys expire after the
retention.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import Store, StoreError, UnknownWorkflow
from .records import (
    RUN,
    SKIP,
    SNOOZE,
    TERMINAL,
    WORKFLOW_CANCELLED,
    Finish,
    StepRecord,
    Transition,
    WorkflowRecord,
)

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
CLEANUP_FAILED = (
    "baton_celery: workflow %s finished, but its index entries could not be cleaned up "
    "(%s); the backstop sweep will retry"
)

# The fields of a step hash that make a StepRecord, in the order the scripts return them.
STEP_FIELDS = (
    "name", "task", "job", "sig", "deps", "ic", "id", "state", "disp", "att",
    "hasres", "res", "err", "orig", "seq", "upd",
)  # fmt: skip

# ---------------------------------------------------------------------------------------
# Lua. Every script gets KEYS[1] = the workflow's meta key and ARGV[1] = the prefix of
# its other keys ("baton:{<id>}:"); the others share its hash tag, so they are local to
# the node that runs the script. ARGV[2] = now, ARGV[3] = retention in ms (< 0: keep),
# ARGV[4] = the global key prefix ("baton:") on a single Redis, "" on a cluster (there the
# client updates the global keys itself).
# ---------------------------------------------------------------------------------------

_PRELUDE = """
local meta, P, now, retention = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local G, wid = ARGV[4], ARGV[5]
local FIELDS = {%(fields)s, 'kids', 'idx', 'rem', 'rn'}
local STATE, DISP, ATT, HASRES, RES, ERR, ORIG, SEQ, UPD = 8, 9, 10, 11, 12, 13, 14, 15, 16
local KIDS, IDX, REM, RN = 17, 18, 19, 20
local TERMINAL = {completed = true, discarded = true, cancelled = true}
local WORKFLOW_CANCELLED = %(cancelled)s

local function skey(n) return P .. 's:' .. n end
local function snap(n) return redis.call('HMGET', skey(n), unpack(FIELDS, 1, 16)) end
-- Read with a step's small fields; the bulky ones only when needed (a fan-in step's deps
-- can be long: its parents' settles must not read them).
local SIG, DEPS = 4, 5
local LIGHT = {}
for i = 1, #FIELDS do
  if i ~= SIG and i ~= DEPS and i ~= RES and i ~= KIDS then LIGHT[#LIGHT + 1] = i end
end
local LIGHT_NAMES = {}
for i = 1, #LIGHT do LIGHT_NAMES[i] = FIELDS[LIGHT[i]] end

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
    local h = redis.call('HMGET', skey(v.name), 'sig', 'deps', 'res', 'kids')
    for _, i in ipairs({SIG, DEPS, RES, KIDS}) do
      if not v.dirty[i] then v[i] = h[_] end
    end
    v.had_res, v.loaded = h[3] ~= false, true
  end
  return v
end
local function set(v, i, value) v[i] = value; v.dirty[i] = true end
local function snapshot(v)
  heavy(v)
  local out = {}
  for i = 1, 16 do out[i] = v[i] end
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
  return state == 'completed' or (state == 'cancelled' and v[6] == '1')
    or (state == 'discarded' and v[7] == '1')
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
"""

# ARGV[6] = step, ARGV[7] = dispatch
_BEGIN = """
local dispatch = tonumber(ARGV[7])
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
if TERMINAL[v[STATE]] or dispatch < tonumber(v[DISP]) then
  return cjson.encode({'skip', only(0, v)})
end

local function cancel_at_gate(err, origin)
  local released, cancelled = {}, {}
  terminate(v, 'cancelled', err, origin)
  propagate(v, released, cancelled)
  return cjson.encode({'skip', settlement(1, v, released, cancelled, claim())})
end

if W.cancel then return cancel_at_gate(WORKFLOW_CANCELLED, v.name) end
if tonumber(v[REM]) > 0 then
  -- Not released by its dependencies (a stray or early message): look at each of them.
  local deps = cjson.decode(heavy(v)[DEPS])
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
    stamp(v)
    flush()
    return cjson.encode({'snooze', only(1, v)})
  end
end
set(v, STATE, 'executing')
set(v, DISP, math.max(tonumber(v[DISP]), dispatch))
set(v, ATT, tonumber(v[ATT]) + 1)
set(v, ERR, false)
stamp(v)
flush()
return cjson.encode({'run', only(1, v)})
"""

# ARGV[6] = step, ARGV[7] = "1" when an error follows, ARGV[8] = error
_RETRYING = """
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
if v[STATE] ~= 'executing' then return cjson.encode({'ok', only(0, v)}) end
set(v, STATE, 'retryable')
set(v, ERR, ARGV[7] == '1' and ARGV[8])
stamp(v)
flush()
return cjson.encode({'ok', only(1, v)})
"""

# ARGV[6] = step, [7] = state, [8] = has_result "1"/"0", [9] = "1" when a result follows,
# [10] = result JSON, [11] = "1" when an error follows, [12] = error,
# [13] = the seq the step must still have ("" for any: the backstop passes one)
_SETTLE = """
local state = ARGV[7]
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
if TERMINAL[v[STATE]] or (ARGV[13] ~= '' and tostring(v[SEQ]) ~= ARGV[13]) then
  return cjson.encode({'ok', only(0, v)})
end
heavy(v)
set(v, HASRES, ARGV[8])
set(v, RES, ARGV[9] == '1' and ARGV[10])
local origin = nil
if state ~= 'completed' then origin = v.name end
terminate(v, state, ARGV[11] == '1' and ARGV[12], origin)
local released, cancelled = {}, {}
propagate(v, released, cancelled)
return cjson.encode({'ok', settlement(1, v, released, cancelled, claim())})
"""

_CANCEL = """
if W.outcome or W.cancel then
  return cjson.encode({'ok', {0, false, {}, {}, false, W.label or false}})
end
W.cancel = true
local cancelled = {}
local names = redis.call('LRANGE', P .. 'steps', 0, -1)
for i = 1, #names do
  local v = get(names[i])
  if v[STATE] == 'pending' then
    terminate(v, 'cancelled', WORKFLOW_CANCELLED, v.name)
    cancelled[#cancelled + 1] = v
  end
end
return cjson.encode({'ok', settlement(1, false, {}, cancelled, claim())})
"""

_LOAD = """
local names = redis.call('LRANGE', P .. 'steps', 0, -1)
local steps = {}
for i = 1, #names do steps[i] = snap(names[i]) end
return {'ok', redis.call('HGETALL', meta), steps}
"""

# ARGV[6..] = step names
_RESULTS = """
local out = {}
for i = 6, #ARGV do
  out[#out + 1] = redis.call('HMGET', skey(ARGV[i]), 'state', 'hasres', 'res')
end
return {'ok', out}
"""

# ARGV[6] = step: the results of its completed dependencies
_DEPENDENCY_RESULTS = """
local v = get(ARGV[6])
if not v then return cjson.encode({'nostep'}) end
local out = {}
for _, dep in ipairs(cjson.decode(heavy(v)[DEPS])) do
  local d = redis.call('HMGET', skey(dep), 'state', 'res')
  if d[1] == 'completed' then out[#out + 1] = {dep, d[2]} end
end
return cjson.encode({'ok', out})
"""

# ARGV[5] = workflow id, ARGV[6] = created (the live index's score), ARGV[7] = the meta
# hash as a JSON list of strings, ARGV[8..] = one JSON list per step: name, job, then
# field/value pairs. Runs without the prelude's existence check.
_CREATE = """
local meta, P, G = KEYS[1], ARGV[1], ARGV[4]
if redis.call('EXISTS', meta) == 1 then return 0 end
redis.call('HSET', meta, unpack(cjson.decode(ARGV[7])))
local names, jobs = {}, {}
for i = 8, #ARGV do
  local step = cjson.decode(ARGV[i])
  redis.call('HSET', P .. 's:' .. step[1], unpack(step, 3))
  names[#names + 1] = step[1]
  jobs[#jobs + 1] = step[2]
end
for i = 1, #names, 1000 do
  local last = math.min(i + 999, #names)
  redis.call('RPUSH', P .. 'steps', unpack(names, i, last))
  redis.call('RPUSH', P .. 'jobs', unpack(jobs, i, last))
end
if G ~= '' then
  redis.call('ZADD', G .. 'live', 'NX', ARGV[6], ARGV[5])
  for i = 1, #names do
    redis.call('SET', G .. 'job:' .. jobs[i], cjson.encode({ARGV[5], names[i]}))
  end
end
return 1
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


_PRELUDE_SOURCE = _PRELUDE % {
    "fields": ", ".join(_lua_string(f) for f in STEP_FIELDS),
    "cancelled": _lua_string(WORKFLOW_CANCELLED),
}

SCRIPTS = {
    "begin": _PRELUDE_SOURCE + _BEGIN,
    "retrying": _PRELUDE_SOURCE + _RETRYING,
    "settle": _PRELUDE_SOURCE + _SETTLE,
    "cancel": _PRELUDE_SOURCE + _CANCEL,
    "load": _PRELUDE_SOURCE + _LOAD,
    "results": _PRELUDE_SOURCE + _RESULTS,
    "dependency_results": _PRELUDE_SOURCE + _DEPENDENCY_RESULTS,
    "create": _CREATE,
}


# --- decoding replies ----------------------------------------------------------------


def _text(value: Any) -> Any:
    """A reply value as Python: bytes decoded, Lua's false (a missing field) as None."""
    if value is False:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _step(values: Sequence[Any]) -> StepRecord:
    (name, task, job, sig, deps, ic, id_, state, disp, att, hasres, res, err, orig, seq,
     upd) = [_text(v) for v in values]  # fmt: skip
    return StepRecord(
        name=name,
        task=task,
        job_id=job,
        signature=json.loads(sig),
        deps=tuple(json.loads(deps)),
        ignore_cancelled=ic == "1",
        ignore_discarded=id_ == "1",
        state=state,
        dispatch=int(disp),
        attempt=int(att),
        has_result=hasres == "1",
        result=None if res is None else json.loads(res),
        error=err,
        origin=orig,
        seq=int(seq),
        updated_at=float(upd),
    )


def _flag(value: bool) -> str:
    return "1" if value else "0"


class RedisStore(Store):
    """Workflows in Redis: one Lua script per transition, keys per step, hash-tagged per
    workflow so that it runs on Redis Cluster too.

    Build it from a URL (``redis://host:6379/0``, ``rediss://...``, ``unix:///path?db=1``,
    ``redis+cluster://host1:7000,host2:7001``) or from a ready ``redis.Redis`` /
    ``redis.cluster.RedisCluster`` client. ``key_prefix`` (URL query ``key_prefix=``)
    namespaces every key; ``timeout`` bounds every socket operation; ``retention`` is how
    long a finished workflow's keys are kept (seconds; negative: forever).

    A call that fails on the connection is retried once (a connection closed by a Redis
    restart); a timed-out reply is not, since the script may have run.
    """

    shared_across_processes = True

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "baton",
        retention: float = 86400.0,
        timeout: float | None = None,
        owns_client: bool = False,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key_prefix must not contain braces: {key_prefix!r}")
        self.client = client
        self.key_prefix = key_prefix
        self.retention = retention
        self.timeout = timeout
        self._owns_client = owns_client
        self.cluster = _is_cluster(client)
        self._shas: dict[str, str] = {}

    # --- construction ----------------------------------------------------------------

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 5.0, retention: float = 86400.0, **options: Any
    ) -> RedisStore:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        key_prefix = query.pop("key_prefix", "baton")
        url = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the redis store needs the redis package: pip install 'baton_celery[redis]'"
            ) from None
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
            # Once, on a connection error only (a pooled connection that a Redis restart
            # closed): a timeout is not retried, the script may have run.
            "retry": Retry(
                ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(redis.ConnectionError,)
            ),
            **options,
        }
        client: Any
        if parts.scheme.endswith("+cluster"):
            from redis.cluster import ClusterNode, RedisCluster

            nodes = []
            for hostport in (parts.netloc.rpartition("@")[2] or "127.0.0.1:6379").split(","):
                host, _, port = hostport.rpartition(":")
                nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))  # type: ignore[no-untyped-call]
            auth = parts.netloc.rpartition("@")[0]
            if auth:
                user, _, password = auth.rpartition(":")
                common.setdefault("password", password or None)
                common.setdefault("username", user or None)
            if parts.scheme.startswith("rediss"):
                common.setdefault("ssl", True)
            try:
                client = RedisCluster(startup_nodes=nodes, **common)
            except redis.RedisError as exc:
                raise StoreError(f"redis cluster store {url}: {exc}") from exc
        else:
            client = redis.Redis.from_url(url, **common)
        return cls(
            client, key_prefix=key_prefix, retention=retention, timeout=timeout, owns_client=True
        )

    def close(self) -> None:
        """Disconnect the idle connections of a client this store made (not one passed
        in). Connections other threads are using stay open; the store remains usable."""
        if not self._owns_client:
            return
        if self.cluster:
            nodes = self.client.get_nodes()
            pools = [n.redis_connection.connection_pool for n in nodes if n.redis_connection]
        else:
            pools = [self.client.connection_pool]
        for pool in pools:
            pool.disconnect(inuse_connections=False)

    # --- keys and calls --------------------------------------------------------------

    def _base(self, workflow_id: str) -> str:
        return f"{self.key_prefix}:{{{workflow_id}}}:"

    def _global(self, key: str) -> str:
        return f"{self.key_prefix}:{key}"

    def _call(self, script: str, workflow_id: str, *args: Any) -> Any:
        """Run one script for one workflow: EVALSHA, loading the script when missing."""
        import redis

        base = self._base(workflow_id)
        argv = (
            base,
            repr(time.time()),
            self._retention_ms(),
            "" if self.cluster else self._global(""),
            workflow_id,
            *args,
        )
        try:
            sha = self._shas.get(script)
            if sha is not None:
                try:
                    return self.client.evalsha(sha, 1, base + "meta", *argv)
                except redis.exceptions.NoScriptError:
                    pass  # a restarted or new node: EVAL loads it again
            reply = self.client.eval(SCRIPTS[script], 1, base + "meta", *argv)
            self._shas[script] = _sha(SCRIPTS[script])
            return reply
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def _checked(self, reply: Any, workflow_id: str, step: str | None = None) -> Any:
        if isinstance(reply, (str, bytes)):  # the transitions answer in one JSON string
            reply = json.loads(reply)
        status = _text(reply[0])
        if status == "unknown":
            raise UnknownWorkflow(workflow_id)
        if status == "nostep":
            raise KeyError(step)
        return reply

    def _retention_ms(self) -> int:
        return -1 if self.retention < 0 else max(1, math.ceil(self.retention * 1000))

    # --- the contract ----------------------------------------------------------------

    def create(self, record: WorkflowRecord) -> None:
        import redis

        meta, steps = _encode(record)
        base = self._base(record.id)
        argv = [base, "", "", "" if self.cluster else self._global(""), record.id,
                repr(record.created_at), meta, *steps]  # fmt: skip
        live = self._global("live")
        try:
            if self.cluster:
                # Index first: an entry whose workflow never got stored is dropped by the
                # backstop; a stored workflow missing from the index would never be swept.
                self.client.zadd(live, {record.id: record.created_at}, nx=True)
            created = self.client.eval(SCRIPTS["create"], 1, base + "meta", *argv)
            if not created:
                raise ValueError(f"workflow {record.id!r} already exists")
            if self.cluster:
                pipe = self.client.pipeline(transaction=False)
                for step in record.steps.values():
                    pipe.set(self._global(f"job:{step.job_id}"), json.dumps([record.id, step.name]))
                pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def load(self, workflow_id: str) -> WorkflowRecord:
        reply = self._checked(self._call("load", workflow_id), workflow_id)
        flat = [_text(v) for v in reply[1]]
        meta = dict(zip(flat[0::2], flat[1::2]))
        steps = [_step(values) for values in reply[2]]
        return WorkflowRecord(
            id=workflow_id,
            label=meta.get("label"),
            steps={s.name: s for s in steps},
            created_at=float(meta["created"]),
            cancel_requested=meta.get("cancel") == "1",
            outcome=meta.get("outcome"),
            finished_at=float(meta["fin"]) if "fin" in meta else None,
            seq=int(meta["seq"]),
        )

    def locate(self, job_id: str) -> tuple[str, str] | None:
        import redis

        try:
            raw = self.client.get(self._global(f"job:{job_id}"))
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        workflow_id, step = json.loads(raw)
        return workflow_id, step

    def begin(self, workflow_id: str, step: str, dispatch: int) -> Transition:
        reply = self._checked(self._call("begin", workflow_id, step, dispatch), workflow_id, step)
        out = self._transition(workflow_id, reply[1])
        out.decision = {"run": RUN, "snooze": SNOOZE, "skip": SKIP}[_text(reply[0])]
        return out

    def retrying(self, workflow_id: str, step: str, error: str | None) -> Transition:
        reply = self._checked(
            self._call("retrying", workflow_id, step, _flag(error is not None), error or ""),
            workflow_id,
            step,
        )
        return self._transition(workflow_id, reply[1])

    def settle(
        self,
        workflow_id: str,
        step: str,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition:
        return self._settle(workflow_id, step, state, has_result, result, error, "")

    def settle_stuck(self, workflow_id: str, step: str, seq: int, error: str) -> Transition:
        return self._settle(workflow_id, step, "discarded", False, None, error, str(seq))

    def _settle(
        self,
        workflow_id: str,
        step: str,
        state: str,
        has_result: bool,
        result: Any,
        error: str | None,
        expect_seq: str,
    ) -> Transition:
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state!r}")
        encoded = "" if result is None else json.dumps(result)
        args = (state, _flag(has_result), _flag(result is not None), encoded,
                _flag(error is not None), error or "", expect_seq)  # fmt: skip
        reply = self._checked(self._call("settle", workflow_id, step, *args), workflow_id, step)
        return self._transition(workflow_id, reply[1])

    def cancel(self, workflow_id: str) -> Transition:
        reply = self._checked(self._call("cancel", workflow_id), workflow_id)
        return self._transition(workflow_id, reply[1])

    def results(self, workflow_id: str, names: Iterable[str]) -> dict[str, Any]:
        wanted = list(names)
        reply = self._checked(self._call("results", workflow_id, *wanted), workflow_id)
        out = {}
        for name, (state, has_result, result) in zip(wanted, reply[1]):
            if _text(state) == "completed" and _text(has_result) == "1":
                out[name] = None if result is None else json.loads(result)
        return out

    def dependency_results(self, workflow_id: str, step: str) -> dict[str, Any]:
        reply = self._call("dependency_results", workflow_id, step)
        pairs = self._checked(reply, workflow_id, step)[1]
        return {name: None if _text(res) is None else json.loads(res) for name, res in pairs}

    def live_workflows(self, before: float | None = None) -> list[str]:
        import redis

        try:
            ids = self.client.zrangebyscore(
                self._global("live"), "-inf", "+inf" if before is None else f"({before!r}"
            )
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        return [_text(i) for i in ids]

    def unindex(self, workflow_id: str, job_ids: Iterable[str] = ()) -> None:
        """Drop a finished (or vanished) workflow from the live index and let its job index
        entries expire with the retention."""
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self._global("live"), workflow_id)
            for job_id in job_ids:
                key = self._global(f"job:{job_id}")
                if self.retention < 0:
                    continue
                pipe.pexpire(key, self._retention_ms())
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    # --- replies -----------------------------------------------------------------------

    def _transition(self, workflow_id: str, raw: Sequence[Any]) -> Transition:
        applied, step, released, cancelled, finish, label = raw
        out = Transition(
            workflow_id,
            _text(label),
            applied=bool(applied),
            step=_step(step) if step else None,
            released=[_step(s) for s in released],
            cancelled=[_step(s) for s in cancelled],
        )
        if finish:
            outcome, failed, total, created, finished_at, seq, jobs = finish
            finished = float(_text(finished_at))
            out.finish = Finish(
                outcome=_text(outcome),
                failed_steps=tuple(_text(f) for f in failed),
                total_count=int(total),
                duration=max(0.0, finished - float(_text(created))),
                finished_at=finished,
                seq=int(seq),
            )
            if self.cluster:
                try:
                    self.unindex(workflow_id, [_text(j) for j in jobs])
                except StoreError as exc:
                    # The finish is committed and must still be announced.
                    logger.warning(CLEANUP_FAILED, workflow_id, exc)
        return out


def _sha(source: str) -> str:
    import hashlib

    return hashlib.sha1(source.encode()).hexdigest()


def _is_cluster(client: Any) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover
        return False
    return isinstance(client, RedisCluster)


def _encode(record: WorkflowRecord) -> tuple[str, list[str]]:
    """The meta hash and every step hash of a new workflow, as the create script takes
    them. Raises TypeError/ValueError (nothing stored) when a value is not JSON."""
    steps = record.steps
    kids: dict[str, list[str]] = {name: [] for name in steps}
    for step in steps.values():
        for dep in dict.fromkeys(step.deps):
            if dep in kids:
                kids[dep].append(step.name)

    def waits_for(step: StepRecord, dep: str) -> bool:
        return dep not in steps or not step.tolerates(steps[dep])

    meta: list[str] = [
        "created", repr(record.created_at), "cancel", _flag(record.cancel_requested),
        "seq", str(record.seq), "n", str(len(steps)),
        "out", str(sum(1 for s in steps.values() if not s.settled)),
    ]  # fmt: skip
    if record.label is not None:
        meta += ["label", record.label]
    if record.outcome is not None:
        meta += ["outcome", record.outcome]
    if record.finished_at is not None:
        meta += ["fin", repr(record.finished_at)]
    encoded = []
    for idx, step in enumerate(steps.values()):
        fields = [
            step.name, step.job_id,
            "name", step.name, "task", step.task, "job", step.job_id,
            "sig", json.dumps(step.signature), "deps", json.dumps(list(step.deps)),
            "kids", json.dumps(kids[step.name]), "rn", repr(step.name), "idx", str(idx),
            "ic", _flag(step.ignore_cancelled), "id", _flag(step.ignore_discarded),
            "state", step.state, "disp", str(step.dispatch), "att", str(step.attempt),
            "hasres", _flag(step.has_result), "seq", str(step.seq),
            "upd", repr(step.updated_at),
            "rem", str(sum(1 for d in dict.fromkeys(step.deps) if waits_for(step, d))),
        ]  # fmt: skip
        if step.result is not None:
            fields += ["res", json.dumps(step.result)]
        if step.error is not None:
            fields += ["err", step.error]
        if step.origin is not None:
            fields += ["orig", step.origin]
        encoded.append(json.dumps(fields, ensure_ascii=False))
    return json.dumps(meta, ensure_ascii=False), encoded
