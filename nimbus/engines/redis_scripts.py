"""Lua sources of the Redis state store: one script per transition of `nimbus.lifecycle`.

Each transition script mirrors the function of the same name in `nimbus/lifecycle.py` exactly:
same fields, same comparisons, same results, a missing record read as `lifecycle.new_record`'s
defaults. `tests/test_state_contract.py` checks it: the same concrete cases run against the
in-memory store and Redis, and a Hypothesis property test compares random operation sequences
on Redis with a fold of the lifecycle functions in Python. Change both files together.

Storage, under a key prefix (e.g. "nimbus:"):

- `{prefix}c:{client_id}`: one hash per client, fields status, pod, epoch, acked, routed_dlq,
  dlq_written, cursor (decimal integers; status one of OFFLINE/REPLAYING/LIVE);
- `{prefix}replaying`: set of the client ids whose status is REPLAYING, kept in sync by every
  script that changes a status;
- `{prefix}clients`: set of every client id that has a record;
- `{prefix}lease:{name}`: a lease, value = owner, expiry = PX.

Like `MemoryState`, which stores the result of every transition it applies, a transition that
touches a client without a record creates the record (with its defaults and the transition's
changes), even when the transition changes nothing else.

Calling convention of the transition scripts: no KEYS; ARGV[1] is the key prefix, then the batch
flattened (see each script). The scripts build key names from the prefix, so they are NOT
Redis-Cluster-safe (Redis cannot route them by declared keys); Nimbus uses a single Redis node.
The lease scripts take their key in KEYS[1].

Within a batch, items are applied in order, each seeing the effect of the previous ones, and the
whole batch is atomic (one script). Records are read once per script and written back once, and
only if some transition changed them (or created them).

Numbers: Redis's Lua is 5.1 with double-precision numbers, so delivery ids, offsets and epochs
must stay below 2**53 (a Kafka offset does). They are written with string.format('%d'): Lua's
tostring would switch to exponent notation and lose digits above 1e14.
"""

from __future__ import annotations

import hashlib

# Shared by every transition script: read a record (cached for the batch), write back the ones
# that changed, keeping the `clients` and `replaying` sets in sync.
_PRELUDE = r"""
local prefix = ARGV[1]
local cache = {}
local touched = {}

local function n2s(x)
  return string.format('%d', x)
end

local function load(cid)
  local r = cache[cid]
  if r then
    return r
  end
  local key = prefix .. 'c:' .. cid
  local v = redis.call('HMGET', key, 'status', 'pod', 'epoch', 'acked', 'routed_dlq',
                       'dlq_written', 'cursor')
  r = {
    id = cid,
    key = key,
    new = not v[1],
    status = v[1] or 'OFFLINE',
    pod = v[2] or '',
    epoch = tonumber(v[3]) or 0,
    acked = tonumber(v[4]) or 0,
    routed_dlq = tonumber(v[5]) or 0,
    dlq_written = tonumber(v[6]) or 0,
    cursor = tonumber(v[7]) or -1,
  }
  r.orig_status = r.status
  r.dirty = r.new
  cache[cid] = r
  touched[#touched + 1] = r
  return r
end

local function flush()
  for _, r in ipairs(touched) do
    if r.dirty then
      redis.call('HSET', r.key, 'status', r.status, 'pod', r.pod, 'epoch', n2s(r.epoch),
                 'acked', n2s(r.acked), 'routed_dlq', n2s(r.routed_dlq),
                 'dlq_written', n2s(r.dlq_written), 'cursor', n2s(r.cursor))
      if r.new then
        redis.call('SADD', prefix .. 'clients', r.id)
      end
      if r.status ~= r.orig_status then
        if r.status == 'REPLAYING' then
          redis.call('SADD', prefix .. 'replaying', r.id)
        elseif r.orig_status == 'REPLAYING' then
          redis.call('SREM', prefix .. 'replaying', r.id)
        end
      end
    end
  end
end
"""

# lifecycle.connect. ARGV: prefix, client_id, pod.
# Returns {epoch, status, previous_pod, previous_epoch}.
CONNECT = (
    _PRELUDE
    + r"""
local r = load(ARGV[2])
local previous_pod = ''
if r.status ~= 'OFFLINE' then
  previous_pod = r.pod
end
local previous_epoch = r.epoch
if r.routed_dlq > r.acked then
  r.status = 'REPLAYING'
else
  r.status = 'LIVE'
end
r.pod = ARGV[3]
r.epoch = r.epoch + 1
r.dirty = true
flush()
return {r.epoch, r.status, previous_pod, previous_epoch}
"""
)

# lifecycle.disconnect. ARGV: prefix, client_id, epoch. Returns 1 if the stream was current.
DISCONNECT = (
    _PRELUDE
    + r"""
local r = load(ARGV[2])
local epoch = tonumber(ARGV[3])
local ok = 0
if r.epoch == epoch and r.status ~= 'OFFLINE' then
  r.status = 'OFFLINE'
  r.pod = ''
  r.dirty = true
  ok = 1
end
flush()
return ok
"""
)

# lifecycle.route. ARGV: prefix, then (client_id, delivery_id) pairs.
# Returns {route, pod, epoch} triples, one per pair, in order.
ROUTE = (
    _PRELUDE
    + r"""
local out = {}
for i = 2, #ARGV, 2 do
  local r = load(ARGV[i])
  local d = tonumber(ARGV[i + 1])
  local n = #out
  if d <= r.acked then
    out[n + 1] = 'DROP'
    out[n + 2] = ''
    out[n + 3] = 0
  elseif r.status == 'LIVE' then
    out[n + 1] = 'LIVE'
    out[n + 2] = r.pod
    out[n + 3] = r.epoch
  else
    if d > r.routed_dlq then
      r.routed_dlq = d
    end
    r.dirty = true
    out[n + 1] = 'DLQ'
    out[n + 2] = ''
    out[n + 3] = 0
  end
end
flush()
return out
"""
)

# lifecycle.divert. ARGV: prefix, then (client_id, delivery_id) pairs.
DIVERT = (
    _PRELUDE
    + r"""
for i = 2, #ARGV, 2 do
  local r = load(ARGV[i])
  local d = tonumber(ARGV[i + 1])
  if d > r.acked then
    if r.status == 'LIVE' then
      r.status = 'REPLAYING'
    end
    if d > r.routed_dlq then
      r.routed_dlq = d
    end
    r.dirty = true
  end
end
flush()
return 0
"""
)

# lifecycle.dlq_written. ARGV: prefix, then (client_id, delivery_id, offset) triples.
DLQ_WRITTEN = (
    _PRELUDE
    + r"""
for i = 2, #ARGV, 3 do
  local r = load(ARGV[i])
  local d = tonumber(ARGV[i + 1])
  local offset = tonumber(ARGV[i + 2])
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
  r.dirty = true
end
flush()
return 0
"""
)

# lifecycle.ack. ARGV: prefix, then (client_id, acked) pairs.
ACK = (
    _PRELUDE
    + r"""
for i = 2, #ARGV, 2 do
  local r = load(ARGV[i])
  local a = tonumber(ARGV[i + 1])
  if a > r.acked then
    r.acked = a
    r.dirty = true
  end
end
flush()
return 0
"""
)

# lifecycle.advance_cursor. ARGV: prefix, then (client_id, offset) pairs.
ADVANCE_CURSOR = (
    _PRELUDE
    + r"""
for i = 2, #ARGV, 2 do
  local r = load(ARGV[i])
  local offset = tonumber(ARGV[i + 1])
  if offset > r.cursor then
    r.cursor = offset
    r.dirty = true
  end
end
flush()
return 0
"""
)

# lifecycle.try_flip. ARGV: prefix, then client ids. Returns 1/0 per id, in order.
TRY_FLIP = (
    _PRELUDE
    + r"""
local out = {}
for i = 2, #ARGV do
  local r = load(ARGV[i])
  if r.status == 'REPLAYING' and not (r.routed_dlq > r.acked) then
    r.status = 'LIVE'
    r.dirty = true
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
flush()
return out
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

SCRIPTS: dict[str, str] = {
    "connect": CONNECT,
    "disconnect": DISCONNECT,
    "route": ROUTE,
    "divert": DIVERT,
    "dlq_written": DLQ_WRITTEN,
    "ack": ACK,
    "advance_cursor": ADVANCE_CURSOR,
    "try_flip": TRY_FLIP,
    "acquire_lease": ACQUIRE_LEASE,
    "release_lease": RELEASE_LEASE,
}


def sha1(source: str) -> str:
    """The SHA Redis gives a script (SCRIPT LOAD / EVALSHA)."""
    return hashlib.sha1(source.encode()).hexdigest()
