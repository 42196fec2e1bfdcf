"""Lua sources of the Redis state store: one script per transition of `nimbus.core.lifecycle`.

Each transition script mirrors the function of the same name in `nimbus/core/lifecycle.py` exactly:
same fields, same comparisons, same results, a missing record read as `lifecycle.new_record`'s
defaults. The status moves are not written here: each script that takes one gets a Lua function
`<event>_to(r, x)` rendered from `lifecycle.TRANSITIONS` (and the route script the table
`lifecycle.ROUTES`), so a change of the table changes the scripts. What the scripts do besides
(the counters, the replies) is written twice, here and in lifecycle.py:
`tests/test_state_contract.py` checks it: the same concrete cases run against the in-memory store
and Redis, every transition of the table is taken on both, and a Hypothesis property test compares
random operation sequences on Redis with a fold of the lifecycle functions in Python.

Storage, under a key prefix (e.g. "nimbus:"). A client's hash expires NIMBUS_RECORD_TTL_SEC
after a disconnect left it OFFLINE with nothing pending (see DISCONNECT):

- `{prefix}c:{client_id}`: one hash per client, fields status, pod, epoch, acked, routed_dlq,
  dlq_written, cursor (decimal integers; status one of OFFLINE/REPLAYING/LIVE);
- `{prefix}replaying`: set of the client ids whose status is REPLAYING, kept in sync by every
  script that changes a status;
- `{prefix}clients`: set of every client id that has a record (an expired record's id is
  removed by the next `all_clients`);
- `{prefix}lease:{name}`: a lease, value = owner, expiry = PX.

Like `MemoryState`, which stores the result of every transition it applies, a transition that
touches a client without a record creates the record (with its defaults and the transition's
changes), even when the transition changes nothing else.

Calling convention of the transition scripts: no KEYS; ARGV[1] is the key prefix; connect and
disconnect take their arguments in ARGV[2..], the batch scripts take the whole batch in ARGV[2]
as one flattened JSON array (e.g. route: ["c1", 7, "c2", 9]), decoded by Redis's cjson. One
string instead of one argument per value: redis-py packs every argument and parses every reply
element in pure Python, which cost more than the script itself (a 500-item route was ~3x slower
with flattened ARGV and a reply of 1500 elements). Replies are compact for the same reason
(route: one JSON array of short strings; try_flip: one string of "1"/"0").
The scripts build key names from the prefix (no declared KEYS). On a single node that is all.
On Redis Cluster (`CLUSTER_SCRIPTS`, used by `nimbus.engines.redis_cluster`) the same scripts
get other key names: a client's record is `<prefix>c:{<client_id>}` (hash tag: the client's
slot), and the two sets are one per slot, `<prefix>clients{T}` and `<prefix>replaying{T}`, T a
short tag that hashes to that slot; the caller passes each client's tag (a JSON object as the
last argument), sends each batch to the master of its clients' slots (split by node), and the
scripts carry `flags=allow-cross-slot-keys` (keys of many slots, all on that node). The lease
scripts take their key in KEYS[1] (Redis routes them).

Within a batch, items are applied in order, each seeing the effect of the previous ones, and the
whole batch is atomic (one script). Records are read once per script and written back once: only
the fields that changed (all of them for a record the script created).

Numbers: Redis's Lua is 5.1 with double-precision numbers, so delivery ids, offsets and epochs
must stay below 2**53 (a Kafka offset does). They are written to hashes and replies with
string.format('%d'), never tostring or cjson.encode (14 significant digits); a number returned
as a script's integer reply is exact.

Besides the transitions: the two lease scripts, and PUBLISH of a batch of messages.
"""

from __future__ import annotations

import hashlib

from nimbus.core import lifecycle
from nimbus.core.lifecycle import ARG, Event, Guard, Status

_LUA_OPS = {"==": "==", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _lua_side(name: str) -> str:
    return "x" if name == ARG else f"r.{name}"


def _lua_guard(g: Guard) -> str:
    return f"{_lua_side(g.left)} {_LUA_OPS[g.op]} {_lua_side(g.right)}"


def lua_transitions(event: Event) -> str:
    """`local function <event>_to(r, x)`: the status `event` (argument x) moves record `r` to,
    nil if it takes no transition; rendered from `lifecycle.TRANSITIONS`, like
    `lifecycle.transition`."""
    lines = [f"local function {event.value}_to(r, x)"]
    branch = "if"
    for status in Status:
        rows = lifecycle.TRANSITIONS[status, event]
        if not rows:
            continue
        lines.append(f"  {branch} r.status == '{status}' then")
        branch = "elseif"
        for t in rows:
            if t.guard is None:
                lines.append(f"    return '{t.to}'")
                break  # the rows after an unguarded one are never reached
            lines.append(
                f"    if {_lua_guard(t.guard)} then return '{t.to}' end  -- {t.guard.name}"
            )
    if branch == "elseif":
        lines.append("  end")
    lines += ["  return nil", "end", ""]
    return "\n".join(lines)


def _lua_routes() -> str:
    """`ROUTES`: lifecycle.ROUTES as a Lua table, status -> 'LIVE' or 'DLQ'."""
    pairs = ", ".join(f"{s} = '{r}'" for s, r in lifecycle.ROUTES.items())
    return f"local ROUTES = {{{pairs}}}\n"


# Key names, single node: the record, and the two sets (one each).
_KEYS_SINGLE = r"""
local prefix = ARGV[1]
local function rkey(cid)
  return prefix .. 'c:' .. cid
end
local function skey(kind, cid)
  return prefix .. kind
end
"""

# Key names, Redis Cluster: the record's key carries the client's hash tag, and each set is one
# per slot (`{prefix}clients{T}`, `{prefix}replaying{T}`, T a tag of the client's slot, given by
# the caller in the last argument as a JSON object client id -> tag), so every key a script
# touches for a client lives in that client's slot. allow-cross-slot-keys: a batch holds clients
# of many slots of one node (the caller splits batches by node).
_KEYS_CLUSTER = r"""#!lua flags=allow-cross-slot-keys
local prefix = ARGV[1]
local TAGS = cjson.decode(ARGV[#ARGV])
local function rkey(cid)
  return prefix .. 'c:{' .. cid .. '}'
end
local function skey(kind, cid)
  return prefix .. kind .. '{' .. TAGS[cid] .. '}'
end
"""

# Shared by every transition script: read a record (cached for the batch), write back the ones
# that changed, keeping the `clients` and `replaying` sets in sync. Every read comes before the
# first write (load in the loop, flush at the end), so a script that fails on a key (on a
# cluster: a slot that moved away) fails before it changed anything.
_PRELUDE = r"""
local FIELDS = {'status', 'pod', 'epoch', 'acked', 'routed_dlq', 'dlq_written', 'cursor'}
local TEXT = {status = true, pod = true}
local cache = {}
local touched = {}

local function n2s(x)
  return string.format('%d', x)
end

-- The record of `cid` as a table (lifecycle.new_record's defaults if there is none), read once.
local function load(cid)
  local r = cache[cid]
  if r then
    return r
  end
  local key = rkey(cid)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  r = {
    status = v[1] or 'OFFLINE',
    pod = v[2] or '',
    epoch = tonumber(v[3]) or 0,
    acked = tonumber(v[4]) or 0,
    routed_dlq = tonumber(v[5]) or 0,
    dlq_written = tonumber(v[6]) or 0,
    cursor = tonumber(v[7]) or -1,
  }
  local orig = {}
  for _, f in ipairs(FIELDS) do
    orig[f] = r[f]
  end
  cache[cid] = r
  touched[#touched + 1] = {id = cid, key = key, new = not v[1], rec = r, orig = orig}
  return r
end

-- Write back what changed (every field of a new record), and keep the sets in sync.
local function flush()
  for _, t in ipairs(touched) do
    local r, orig = t.rec, t.orig
    local args = {}
    for _, f in ipairs(FIELDS) do
      if t.new or r[f] ~= orig[f] then
        args[#args + 1] = f
        args[#args + 1] = TEXT[f] and r[f] or n2s(r[f])
      end
    end
    if #args > 0 then
      redis.call('HSET', t.key, unpack(args))
    end
    if t.new then
      redis.call('SADD', skey('clients', t.id), t.id)
    elseif r.routed_dlq > r.acked and orig.routed_dlq <= orig.acked then
      redis.call('PERSIST', t.key)  -- something is pending again: the record must stay
    end
    if r.status ~= orig.status then
      if r.status == 'REPLAYING' then
        redis.call('SADD', skey('replaying', t.id), t.id)
      elseif orig.status == 'REPLAYING' then
        redis.call('SREM', skey('replaying', t.id), t.id)
      end
    end
  end
end
"""

# lifecycle.connect. ARGV: prefix, client_id, pod.
# Returns {epoch, status, previous_pod, previous_epoch}.
CONNECT = (
    _PRELUDE
    + lua_transitions(Event.CONNECT)
    + r"""
local r = load(ARGV[2])
local previous_pod = ''
if r.status ~= 'OFFLINE' then
  previous_pod = r.pod
end
local previous_epoch = r.epoch
r.status = connect_to(r)
r.pod = ARGV[3]
r.epoch = r.epoch + 1
flush()
redis.call('PERSIST', rkey(ARGV[2]))
return {r.epoch, r.status, previous_pod, previous_epoch}
"""
)

# lifecycle.disconnect. ARGV: prefix, client_id, epoch, record ttl in ms (0: none).
# Returns 1 if the stream was current. A record left OFFLINE with nothing pending expires after
# the ttl, unless a connect (CONNECT) or a backlog (flush) PERSISTs it first.
DISCONNECT = (
    _PRELUDE
    + lua_transitions(Event.DISCONNECT)
    + r"""
local r = load(ARGV[2])
local epoch = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4]) or 0
local ok = 0
local to = disconnect_to(r, epoch)
if to then
  r.status = to
  r.pod = ''
  ok = 1
end
flush()
if ok == 1 and ttl > 0 and r.routed_dlq <= r.acked then
  redis.call('PEXPIRE', rkey(ARGV[2]), ttl)
end
return ok
"""
)

# lifecycle.route. ARGV: prefix, JSON [client_id, delivery_id, ...].
# Returns a JSON array, one string per item, in order: "D" (DROP), "Q" (DLQ), or
# "L{epoch}:{pod}" (LIVE).
ROUTE = (
    _PRELUDE
    + lua_transitions(Event.ROUTE)
    + _lua_routes()
    + r"""
local items = cjson.decode(ARGV[2])
local out = {}
for i = 1, #items, 2 do
  local r = load(items[i])
  local d = items[i + 1]
  if not route_to(r, d) then
    out[#out + 1] = 'D'
  elseif ROUTES[r.status] == 'LIVE' then
    out[#out + 1] = 'L' .. n2s(r.epoch) .. ':' .. r.pod
  else
    if d > r.routed_dlq then
      r.routed_dlq = d
    end
    out[#out + 1] = 'Q'
  end
end
flush()
return cjson.encode(out)
"""
)

# lifecycle.divert. ARGV: prefix, JSON [client_id, delivery_id, ...].
DIVERT = (
    _PRELUDE
    + lua_transitions(Event.DIVERT)
    + r"""
local items = cjson.decode(ARGV[2])
for i = 1, #items, 2 do
  local r = load(items[i])
  local d = items[i + 1]
  local to = divert_to(r, d)
  if to then
    r.status = to
    if d > r.routed_dlq then
      r.routed_dlq = d
    end
  end
end
flush()
return 0
"""
)

# lifecycle.dlq_written. ARGV: prefix, JSON [client_id, delivery_id, offset, ...].
DLQ_WRITTEN = (
    _PRELUDE
    + r"""
local items = cjson.decode(ARGV[2])
for i = 1, #items, 3 do
  local r = load(items[i])
  local d = items[i + 1]
  local offset = items[i + 2]
  local cursor = r.cursor
  if r.acked >= r.dlq_written and offset > cursor then
    cursor = offset
  end
  if cursor < 0 then
    cursor = offset
  end
  r.cursor = cursor
  if d > r.dlq_written then
    r.dlq_written = d
  end
end
flush()
return 0
"""
)

# lifecycle.ack. ARGV: prefix, JSON [client_id, acked, ...].
# Returns one string, per item in order: "1" if the client is now ready for the flip
# (lifecycle.flip_ready), else "0".
ACK = (
    _PRELUDE
    + lua_transitions(Event.FLIP)
    + r"""
local items = cjson.decode(ARGV[2])
local out = {}
for i = 1, #items, 2 do
  local r = load(items[i])
  local a = items[i + 1]
  if a > r.acked then
    r.acked = a
  end
  if try_flip_to(r) then
    out[#out + 1] = '1'
  else
    out[#out + 1] = '0'
  end
end
flush()
return table.concat(out)
"""
)

# lifecycle.advance_cursor. ARGV: prefix, JSON [client_id, offset, ...].
ADVANCE_CURSOR = (
    _PRELUDE
    + r"""
local items = cjson.decode(ARGV[2])
for i = 1, #items, 2 do
  local r = load(items[i])
  local offset = items[i + 1]
  if offset > r.cursor then
    r.cursor = offset
  end
end
flush()
return 0
"""
)

# lifecycle.try_flip. ARGV: prefix, JSON [client_id, ...].
# Returns one string, a "1" (flipped) or "0" per id, in order.
TRY_FLIP = (
    _PRELUDE
    + lua_transitions(Event.FLIP)
    + r"""
local items = cjson.decode(ARGV[2])
local out = {}
for i = 1, #items do
  local r = load(items[i])
  local to = try_flip_to(r)
  if to then
    r.status = to
    out[i] = '1'
  else
    out[i] = '0'
  end
end
flush()
return table.concat(out)
"""
)

# Leases (not lifecycle transitions). KEYS[1]: the lease key.
# acquire: ARGV owner, ttl_ms. Take a free (or expired: Redis dropped it) lease or renew our own.
ACQUIRE_LEASE = r"""
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# release: ARGV owner. Compare-and-delete.
RELEASE_LEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Publish many messages, in order, with one command (a pipeline of PUBLISH costs redis-py one
# reply to parse per message). ARGV: channel, payload, channel, payload...
PUBLISH = r"""
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return 0
"""

_TRANSITIONS = {
    "connect": CONNECT,
    "disconnect": DISCONNECT,
    "route": ROUTE,
    "divert": DIVERT,
    "dlq_written": DLQ_WRITTEN,
    "ack": ACK,
    "advance_cursor": ADVANCE_CURSOR,
    "try_flip": TRY_FLIP,
}
_LEASES = {"acquire_lease": ACQUIRE_LEASE, "release_lease": RELEASE_LEASE}

# Redis Cluster: PUBLISH of a batch as sharded pub/sub, for channels of one node's slots (the
# caller splits a batch by node). ARGV: channel, payload, channel, payload...
SPUBLISH = r"""#!lua flags=allow-cross-slot-keys
for i = 1, #ARGV, 2 do
  redis.call('SPUBLISH', ARGV[i], ARGV[i + 1])
end
return 0
"""

# Redis Cluster: the members of one kind of per-slot set (`clients` or `replaying`) over many
# slots of one node. ARGV: the sets' key base ("{prefix}replaying"), JSON array of slot tags.
GATHER = r"""#!lua flags=allow-cross-slot-keys,no-writes
local out = {}
for _, tag in ipairs(cjson.decode(ARGV[2])) do
  for _, m in ipairs(redis.call('SMEMBERS', ARGV[1] .. '{' .. tag .. '}')) do
    out[#out + 1] = m
  end
end
return out
"""

# The scripts a single-node store loads, by name.
SCRIPTS: dict[str, str] = {
    **{name: _KEYS_SINGLE + body for name, body in _TRANSITIONS.items()},
    **_LEASES,
    "publish": PUBLISH,
}

# The scripts a Redis Cluster store loads on every master: the same transitions with the
# cluster's key names (their last argument is the clients' slot tags), sharded publish, gather.
CLUSTER_SCRIPTS: dict[str, str] = {
    **{name: _KEYS_CLUSTER + body for name, body in _TRANSITIONS.items()},
    **_LEASES,
    "publish": SPUBLISH,
    "gather": GATHER,
}


def sha1(source: str) -> str:
    """The SHA Redis gives a script (SCRIPT LOAD / EVALSHA)."""
    return hashlib.sha1(source.encode()).hexdigest()
