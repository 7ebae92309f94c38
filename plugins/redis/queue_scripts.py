"""Lua scripts of the Queue interfaces: every lease change is one script, so two consumers can
never lease the same message and a message is always in exactly one state.

Layout (all under the namespace segment, see plugins/redis/keys.py; queue names cannot contain
`:`): `q:<queue>:r` ready sorted set, `q:<queue>:d` delayed (score = due ms),
`q:<queue>:l` leased (score = lease end ms), `q:<queue>:dl` messages dead-lettered into the
queue (score = arrival order), `q:<queue>:c` dead-letter config hash, `q:<queue>:seq` arrival
counter, and one hash per message `qm:<id>` (q queue, p payload, a attributes JSON, t enqueue ms,
pr priority, dc delivery count, s ready score, h receipt token of the live lease, src queue it
was dead-lettered from).

The ready score is `(1000 - priority) * 2^42 + arrival`: ascending order is priority descending
then FIFO, exact in a double up to 2^42 arrivals per queue; a message made visible again is
re-added with its stored score, so it keeps its place. Every script takes ARGV[1] = the queue
key prefix and ARGV[2] = the message key prefix; times come from the Redis server clock.
"""

from __future__ import annotations

PRELUDE = """
local QP = ARGV[1]
local MP = ARGV[2]
local SPAN = 4398046511104

local function qk(queue, tag)
  return QP .. queue .. ':' .. tag
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A place at the back of `queue`: returns (ready score, arrival number).
local function place(queue, priority)
  local arrival = redis.call('INCR', qk(queue, 'seq'))
  return (1000 - priority) * SPAN + arrival, arrival
end

-- Move a message (already out of every set of `from`) to the back of `target`, undelivered and
-- unleased; `source` is the queue it is dead-lettered from ('' when redriven).
local function move(id, from, target, source)
  local m = MP .. id
  redis.call('ZREM', qk(from, 'dl'), id)
  local score, arrival = place(target, tonumber(redis.call('HGET', m, 'pr')))
  redis.call('HSET', m, 'q', target, 'src', source, 'dc', 0, 'h', '', 's', score)
  redis.call('ZADD', qk(target, 'r'), score, id)
  if source ~= '' then
    redis.call('ZADD', qk(target, 'dl'), arrival, id)
  end
end

-- A lease ended without an Ack: back in its place, or to the DLQ after its last delivery.
local function end_lease(queue, id)
  local m = MP .. id
  redis.call('ZREM', qk(queue, 'l'), id)
  local cfg = redis.call('HMGET', qk(queue, 'c'), 'dlq', 'max')
  if cfg[1] and tonumber(redis.call('HGET', m, 'dc')) >= tonumber(cfg[2]) then
    move(id, queue, cfg[1], queue)
    return
  end
  redis.call('HSET', m, 'h', '')
  redis.call('ZADD', qk(queue, 'r'), redis.call('HGET', m, 's'), id)
end

-- Expired leases end; delayed messages that are due become visible.
local function refresh(queue, now)
  for _, id in ipairs(redis.call('ZRANGE', qk(queue, 'l'), '-inf', now, 'BYSCORE')) do
    end_lease(queue, id)
  end
  for _, id in ipairs(redis.call('ZRANGE', qk(queue, 'd'), '-inf', now, 'BYSCORE')) do
    redis.call('ZREM', qk(queue, 'd'), id)
    redis.call('ZADD', qk(queue, 'r'), redis.call('HGET', MP .. id, 's'), id)
  end
end

-- True when `token` is the live lease of message `id` in `queue`.
local function live(queue, id, token, now)
  local f = redis.call('HMGET', MP .. id, 'q', 'h')
  if f[1] ~= queue or f[2] ~= token or token == '' then
    return false
  end
  local ends = redis.call('ZSCORE', qk(queue, 'l'), id)
  return ends ~= false and tonumber(ends) > now
end

local function fields(id)
  return redis.call('HMGET', MP .. id, 'p', 'a', 't', 'pr', 'dc')
end
"""

#: ARGV queue, id, payload, attributes, priority, mode ('now'|'delay'|'at'), ms → due ms
ENQUEUE = """
local queue, id = ARGV[3], ARGV[4]
local priority = tonumber(ARGV[7])
local now = now_ms()
local due = now
if ARGV[8] == 'delay' then
  due = now + tonumber(ARGV[9])
elseif ARGV[8] == 'at' then
  due = math.max(now, tonumber(ARGV[9]))
end
local score = place(queue, priority)
redis.call('HSET', MP .. id, 'q', queue, 'p', ARGV[5], 'a', ARGV[6], 't', now,
           'pr', priority, 'dc', 0, 's', score, 'h', '', 'src', '')
if due > now then
  redis.call('ZADD', qk(queue, 'd'), due, id)
else
  redis.call('ZADD', qk(queue, 'r'), score, id)
end
return due
"""

#: ARGV queue, count, lease ms, then one receipt token per message wanted
#: → flat: id, payload, attributes, enqueue ms, priority, delivery count per leased message
LEASE = """
local queue = ARGV[3]
local now = now_ms()
refresh(queue, now)
local out = {}
local ids = redis.call('ZRANGE', qk(queue, 'r'), 0, tonumber(ARGV[4]) - 1)
for i, id in ipairs(ids) do
  redis.call('ZREM', qk(queue, 'r'), id)
  redis.call('ZADD', qk(queue, 'l'), now + tonumber(ARGV[5]), id)
  redis.call('HINCRBY', MP .. id, 'dc', 1)
  redis.call('HSET', MP .. id, 'h', ARGV[5 + i])
  local f = fields(id)
  out[#out + 1] = id
  for _, v in ipairs(f) do
    out[#out + 1] = v
  end
end
return out
"""

#: ARGV queue, count → the same flat list as LEASE, nothing leased
PEEK = """
local queue = ARGV[3]
refresh(queue, now_ms())
local out = {}
for _, id in ipairs(redis.call('ZRANGE', qk(queue, 'r'), 0, tonumber(ARGV[4]) - 1)) do
  out[#out + 1] = id
  for _, v in ipairs(fields(id)) do
    out[#out + 1] = v
  end
end
return out
"""

#: ARGV queue, id, token → 1, or 0 when the handle is not a live lease
ACK = """
local queue, id = ARGV[3], ARGV[4]
if not live(queue, id, ARGV[5], now_ms()) then
  return 0
end
redis.call('DEL', MP .. id)
redis.call('ZREM', qk(queue, 'l'), id)
redis.call('ZREM', qk(queue, 'dl'), id)
return 1
"""

#: ARGV queue, id, token, lease ms → the new lease end (ms), or -1 for an invalid handle
EXTEND = """
local queue, id = ARGV[3], ARGV[4]
local now = now_ms()
if not live(queue, id, ARGV[5], now) then
  return -1
end
local ends = now + tonumber(ARGV[6])
redis.call('ZADD', qk(queue, 'l'), ends, id)
return ends
"""

#: ARGV queue, id, token → 1, or 0 when the handle is not a live lease
RELEASE = """
local queue, id = ARGV[3], ARGV[4]
if not live(queue, id, ARGV[5], now_ms()) then
  return 0
end
end_lease(queue, id)
return 1
"""

#: ARGV queue, limit → messages moved back, or -1 when the queue has no DLQ configured
REDRIVE = """
local queue, limit = ARGV[3], tonumber(ARGV[4])
local now = now_ms()
refresh(queue, now)
local dlq = redis.call('HGET', qk(queue, 'c'), 'dlq')
if not dlq then
  return -1
end
refresh(dlq, now)
local moved = 0
for _, id in ipairs(redis.call('ZRANGE', qk(dlq, 'dl'), 0, -1)) do
  if moved >= limit then
    break
  end
  if redis.call('HGET', MP .. id, 'src') == queue and redis.call('ZSCORE', qk(dlq, 'r'), id) then
    redis.call('ZREM', qk(dlq, 'r'), id)
    move(id, dlq, queue, '')
    moved = moved + 1
  end
end
return moved
"""

#: ARGV queue → messages not yet due
SCHEDULED = """
return redis.call('ZCOUNT', qk(ARGV[3], 'd'), '(' .. now_ms(), '+inf')
"""
