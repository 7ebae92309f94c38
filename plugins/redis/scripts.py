"""Lua scripts: every KeyValue write runs as one script so the entry, its revision, the key
index and the expiry index change together (Redis runs a script atomically).

Each script is the shared prelude (helper functions) plus its own body. Scripts reach data keys
they build from the namespace's data prefix, so they need a standalone Redis (not Cluster).
Revisions are Lua numbers: exact up to 2^53 writes per key prefix.
"""

from __future__ import annotations

PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Write an entry under a fresh revision. ttl_ms > 0 sets an expiry, anything else clears it.
local function put(counter, index, expiring, data, member, value, ttl_ms)
  local rev = redis.call('INCR', counter)
  redis.call('HSET', data, 'v', value, 'r', rev)
  redis.call('ZADD', index, 0, member)
  if ttl_ms > 0 then
    redis.call('PEXPIRE', data, ttl_ms)
    redis.call('ZADD', expiring, redis.call('PEXPIRETIME', data), member)
  else
    redis.call('PERSIST', data)
    redis.call('ZREM', expiring, member)
  end
  return rev
end

local function remove(index, expiring, data, member)
  local existed = redis.call('DEL', data)
  redis.call('ZREM', index, member)
  redis.call('ZREM', expiring, member)
  return existed
end

local function revision(data)
  return tonumber(redis.call('HGET', data, 'r')) or 0
end

-- Drop from the key index the keys Redis has already expired, so ZLEXCOUNT and BYLEX pages see
-- only live keys. A key whose expiry time has passed but that Redis still holds stays (Redis
-- decides when a key is gone); a later call removes it.
local function prune(index, expiring, dprefix)
  local due = redis.call('ZRANGE', expiring, '-inf', now_ms(), 'BYSCORE')
  for _, member in ipairs(due) do
    if redis.call('EXISTS', dprefix .. member) == 0 then
      redis.call('ZREM', index, member)
      redis.call('ZREM', expiring, member)
    end
  end
end
"""

#: KEYS counter, index, expiring, data; ARGV member, value, ttl_ms → revision
SET = """
return put(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]))
"""

#: KEYS index, expiring, data; ARGV member → 1 if the key existed
DELETE = """
return remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
"""

#: KEYS counter, index, expiring, data...; ARGV ttl_ms, then member, value per data key
#: → revisions in order
BATCH_SET = """
local ttl = tonumber(ARGV[1])
local revs = {}
for i = 4, #KEYS do
  local j = (i - 4) * 2 + 2
  revs[#revs + 1] = put(KEYS[1], KEYS[2], KEYS[3], KEYS[i], ARGV[j], ARGV[j + 1], ttl)
end
return revs
"""

#: KEYS index, expiring, data...; ARGV member per data key → 1/0 per key in order
BATCH_DELETE = """
local out = {}
for i = 3, #KEYS do
  out[#out + 1] = remove(KEYS[1], KEYS[2], KEYS[i], ARGV[i - 2])
end
return out
"""

#: KEYS counter, index, expiring, data; ARGV member, value, expected, ttl_ms
#: → {1, new revision} or {0, current revision}
COMPARE_AND_SWAP = """
local current = revision(KEYS[4])
if current ~= tonumber(ARGV[3]) then
  return {0, current}
end
return {1, put(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[4]))}
"""

#: KEYS index, expiring, data; ARGV member, expected → {1, 0} or {0, current revision}
COMPARE_AND_DELETE = """
local current = revision(KEYS[3])
if current ~= tonumber(ARGV[2]) then
  return {0, current}
end
remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return {1, 0}
"""

#: KEYS counter, expiring, data; ARGV member, ttl_ms → 1 if applied (the key exists)
EXPIRE = """
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('HSET', KEYS[3], 'r', redis.call('INCR', KEYS[1]))
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], redis.call('PEXPIRETIME', KEYS[3]), ARGV[1])
return 1
"""

#: KEYS counter, expiring, data; ARGV member → 1 if an expiry was removed
PERSIST = """
if redis.call('PERSIST', KEYS[3]) == 0 then
  return 0
end
redis.call('HSET', KEYS[3], 'r', redis.call('INCR', KEYS[1]))
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

#: KEYS index, expiring; ARGV data prefix, min, max, limit, with_values ('1'/'0')
#: → {more, last member scanned, member[, value, revision] per live key in byte order...};
#: `more` is 1 when keys follow the last one scanned
SCAN = """
prune(KEYS[1], KEYS[2], ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[3], 'BYLEX', 'LIMIT', 0, ARGV[4])
local out = {0, ''}
if #members == 0 then
  return out
end
local last = members[#members]
out[2] = last
if #redis.call('ZRANGE', KEYS[1], '(' .. last, ARGV[3], 'BYLEX', 'LIMIT', 0, 1) > 0 then
  out[1] = 1
end
for _, member in ipairs(members) do
  local entry = redis.call('HMGET', ARGV[1] .. member, 'v', 'r')
  if entry[1] then
    out[#out + 1] = member
    if ARGV[5] == '1' then
      out[#out + 1] = entry[1]
      out[#out + 1] = entry[2]
    end
  end
end
return out
"""

#: KEYS index, expiring; ARGV data prefix, min, max → number of live keys in the range
COUNT = """
prune(KEYS[1], KEYS[2], ARGV[1])
return redis.call('ZLEXCOUNT', KEYS[1], ARGV[2], ARGV[3])
"""

#: KEYS counter, index, expiring; ARGV data prefix, ttl_ms, number of reads, then
#: (member, revision seen) per read, then ('s', member, value) or ('d', member, '') per op
#: → {1} committed, or {0, member} for the first read whose revision changed
COMMIT = """
local dprefix = ARGV[1]
local ttl = tonumber(ARGV[2])
local reads = tonumber(ARGV[3])
for i = 0, reads - 1 do
  local member = ARGV[4 + i * 2]
  if revision(dprefix .. member) ~= tonumber(ARGV[5 + i * 2]) then
    return {0, member}
  end
end
for j = 4 + reads * 2, #ARGV, 3 do
  local member = ARGV[j + 1]
  if ARGV[j] == 's' then
    put(KEYS[1], KEYS[2], KEYS[3], dprefix .. member, member, ARGV[j + 2], ttl)
  else
    remove(KEYS[2], KEYS[3], dprefix .. member, member)
  end
end
return {1}
"""
