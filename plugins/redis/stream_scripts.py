"""Lua scripts of the Stream interfaces, on one Redis stream per Prism stream.

Offsets map to explicit stream IDs `0-<offset>`: Append uses XADD with ID `0-*`, so Redis itself
assigns the next sequence number (1 for the first record) and never reuses one, even after
trimming. Records are only ever removed from the oldest end (XTRIM MAXLEN / MINID), so the
retained offsets are one contiguous range. A record's fields are, in order: k key, p payload,
a attributes JSON, t append time (ms, from the Redis clock, never below the previous record's).

Keys (under the namespace segment, see plugins/redis/keys.py; stream and group names cannot
contain `:`): `s:<stream>:log` the Redis stream, `s:<stream>:meta` hash (lt last append ms,
lo last offset, mr max_records, ma max_age ms), `s:<stream>:g:<group>` group hash (ack timeout
ms), `s:<stream>:g:<group>:live` sorted set of live consumers scored by lease end (ms). Every
script takes ARGV[1] = `<segment>s:<stream>:`.
"""

from __future__ import annotations

PRELUDE = """
local SP = ARGV[1]

local function sk(tag)
  return SP .. tag
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function offset_of(id)
  return tonumber(string.match(id, '^0%-(%d+)$'))
end

local function latest()
  return tonumber(redis.call('HGET', sk('meta'), 'lo')) or 0
end

local function first_retained()
  local first = redis.call('XRANGE', sk('log'), '-', '+', 'COUNT', 1)
  if #first == 0 then
    return 0
  end
  return offset_of(first[1][1])
end

-- Apply the retention limits now (oldest records first).
local function enforce(now)
  local limits = redis.call('HMGET', sk('meta'), 'mr', 'ma')
  local log = sk('log')
  local max_records = tonumber(limits[1]) or 0
  if max_records > 0 then
    redis.call('XTRIM', log, 'MAXLEN', max_records)
  end
  local max_age = tonumber(limits[2]) or 0
  if max_age <= 0 then
    return
  end
  local cutoff = now - max_age
  while true do
    local batch = redis.call('XRANGE', log, '-', '+', 'COUNT', 100)
    if #batch == 0 then
      return
    end
    for _, entry in ipairs(batch) do
      if tonumber(entry[2][8]) >= cutoff then
        redis.call('XTRIM', log, 'MINID', entry[1])
        return
      end
    end
    redis.call('XTRIM', log, 'MINID', '0-' .. (offset_of(batch[#batch][1]) + 1))
  end
end

local function group_key(group)
  return sk('g:' .. group)
end
"""

#: ARGV key, payload, attributes → {offset, append ms}
APPEND = """
local now = now_ms()
local last = tonumber(redis.call('HGET', sk('meta'), 'lt')) or 0
if now < last then
  now = last
end
local id = redis.call('XADD', sk('log'), '0-*', 'k', ARGV[2], 'p', ARGV[3], 'a', ARGV[4], 't', now)
local offset = offset_of(id)
redis.call('HSET', sk('meta'), 'lt', now, 'lo', offset)
enforce(now)
return {offset, now}
"""

#: ARGV first offset, last offset, count → flat: offset, key, payload, attributes, ms per record
RANGE = """
enforce(now_ms())
local out = {}
local log = sk('log')
for _, e in ipairs(redis.call('XRANGE', log, '0-' .. ARGV[2], '0-' .. ARGV[3], 'COUNT', ARGV[4])) do
  out[#out + 1] = offset_of(e[1])
  out[#out + 1] = e[2][2]
  out[#out + 1] = e[2][4]
  out[#out + 1] = e[2][6]
  out[#out + 1] = e[2][8]
end
return out
"""

#: → {latest offset, first retained offset}
OFFSETS = """
enforce(now_ms())
return {latest(), first_retained()}
"""

#: ARGV time (ms) → the first retained offset appended at or after it, or 0. Append times never
#: decrease with offsets and retained offsets are contiguous, so this is a binary search.
OFFSET_FOR_TIME = """
enforce(now_ms())
local target = tonumber(ARGV[2])
local low, high = first_retained(), latest()
if low == 0 then
  return 0
end
local function time_at(offset)
  local e = redis.call('XRANGE', sk('log'), '0-' .. offset, '0-' .. offset)
  return tonumber(e[1][2][8])
end
if time_at(high) < target then
  return 0
end
while low < high do
  local mid = math.floor((low + high) / 2)
  if time_at(mid) >= target then
    high = mid
  else
    low = mid + 1
  end
end
return low
"""

#: ARGV before offset → records removed, or -1 when it is beyond the latest offset + 1
TRIM = """
local before = tonumber(ARGV[2])
if before > latest() + 1 then
  return -1
end
return redis.call('XTRIM', sk('log'), 'MINID', '0-' .. before)
"""

#: ARGV max_records, max_age ms
SET_RETENTION = """
redis.call('HSET', sk('meta'), 'mr', ARGV[2], 'ma', ARGV[3])
enforce(now_ms())
return 1
"""

#: ARGV group, mode ('earliest'|'latest'|'offset'), start offset, ack ms → 1, or 0 if it exists
CREATE_GROUP = """
local group = ARGV[2]
if redis.call('EXISTS', group_key(group)) == 1 then
  return 0
end
enforce(now_ms())
local last = latest()
local delivered = last
if ARGV[3] == 'earliest' then
  local first = first_retained()
  if first > 0 then
    delivered = first - 1
  end
elseif ARGV[3] == 'offset' then
  delivered = tonumber(ARGV[4]) - 1
end
redis.call('XGROUP', 'CREATE', sk('log'), group, '0-' .. delivered, 'MKSTREAM')
redis.call('HSET', group_key(group), 'ack', ARGV[5])
return 1
"""

#: ARGV group, consumer, lease ms, 'join'|'renew' → 1, or 0 when another live stream holds the
#: name (join), or -1 when the group does not exist
CLAIM_CONSUMER = """
local g = group_key(ARGV[2])
if redis.call('EXISTS', g) == 0 then
  return -1
end
local now = now_ms()
local live = g .. ':live'
if ARGV[5] == 'join' then
  local held = redis.call('ZSCORE', live, ARGV[3])
  if held and tonumber(held) > now then
    return 0
  end
end
redis.call('ZADD', live, now + tonumber(ARGV[4]), ARGV[3])
return 1
"""

#: ARGV group, consumer
LEAVE = """
redis.call('ZREM', group_key(ARGV[2]) .. ':live', ARGV[3])
return 1
"""

#: ARGV group, then stream IDs → records acknowledged, or -1 when the group does not exist
ACK = """
if redis.call('EXISTS', group_key(ARGV[2])) == 0 then
  return -1
end
return redis.call('XACK', sk('log'), ARGV[2], unpack(ARGV, 3))
"""

#: ARGV group → {ack ms, live consumers (name, lease end ms)..., now} or {-1} without the group
GROUP_STATE = """
local g = group_key(ARGV[2])
local ack = redis.call('HGET', g, 'ack')
if not ack then
  return {-1}
end
local out = {tonumber(ack), now_ms()}
for _, v in ipairs(redis.call('ZRANGE', g .. ':live', 0, -1, 'WITHSCORES')) do
  out[#out + 1] = v
end
return out
"""
