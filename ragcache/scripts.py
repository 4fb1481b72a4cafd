"""The Redis scripts. Each touches keys of one hash slot (one virtual shard, see keys.py),
so each runs unchanged on a standalone Redis and on Redis Cluster.

They are plain EVAL scripts, without a shebang line, on purpose: when Redis is out of
memory under ``noeviction`` it refuses a flagged script outright, even one that only
reads, whereas a plain script runs and only its writes fail. Every write that is not
the point of the script (usage events, locks, stamps) goes through ``redis.pcall``, so a
full Redis still serves hits; the script reports what it could not write.

Usage events (XADD to the shard's stream) carry: ``r`` result, ``h`` header (policy,
model, scope, key, gateway key; see usage.py), ``w`` what the caller had waited (µs),
``x`` reason, ``e`` the entry's metadata (hits and stores). The entry id gives the time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    # Safe to run again when its reply was lost to a dead connection (the worst a second run
    # does is one usage event twice); PUBLISH is not: followers would get a chunk twice.
    retry_safe: bool = True
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# Shared Lua: a shard's policy version copy as a number. Anything else there (foreign
# bytes, another type) counts as 0, and a key of another type is deleted: it is ragcache's
# key, and every script of the shard reads it.
_VERSION_LUA = """
local function version_of(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then redis.call('UNLINK', key); return 0 end
  return tonumber(v or '0') or 0
end
"""

# Shared Lua: append a usage event; its id, or false when Redis refused it (full).
_EVENT_LUA = """
local function event(stream, maxlen, fields)
  local id = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  if type(id) == 'table' and id.err then return false end
  return id
end
"""

# Shared Lua: the current stamps ("s1,s2") of the sources "h1,h2" under the shard's stamp key
# base, each created (value ``new``, ``ttl`` ms) if missing; "-" for one Redis refused to
# create (full): the write guard then refuses the answer, as it cannot be checked later.
_STAMPS_LUA = """
local function stamps_of(base, sources, new, ttl)
  local stamps = {}
  if sources == '' then return '' end
  for h in string.gmatch(sources, '%x+') do
    local stamp = redis.call('GET', base .. h)
    if not stamp then
      redis.pcall('SET', base .. h, new, 'NX', 'PX', ttl)
      stamp = redis.call('GET', base .. h) or '-'
    end
    stamps[#stamps + 1] = stamp
  end
  return table.concat(stamps, ',')
end
"""

# KEYS: 1 entry, 2 usage stream, 3 policy version copy, 4 lock
# ARGV: 1 snapshot version, 2 record ("1"/"0"), 3 hit result (hit | shadow_hit), 4 lock ms (0: none),
#       5 lock token, 6 stream maxlen, 7 event header, 8 waited µs, 9 metadata prefix,
#       10 stamp key base, 11 the request's sources ("h1,h2" or ""), 12 new stamp value, 13 stamp ttl ms
# Replies: {'stale', version} | {'hit', version, meta, body, lost, event id}
#        | {'follower', version, leader token} | {'miss' | 'leader', version, reason, lost, stamps}
# A hit checks the stamps recorded with the entry against the current ones: an invalidated
# (deleted) or evicted stamp makes the entry stale. Anything at the key that ragcache did
# not write in this schema is deleted and answered as a miss ("corrupt"). On a miss, the
# stamps of the request's sources are read (and created if missing), for the write guard.
LOOKUP = Script("lookup", _VERSION_LUA + _EVENT_LUA + _STAMPS_LUA + """
local version = version_of(KEYS[3])
if version > tonumber(ARGV[1]) then return {'stale', version} end
local reason = ''
local found = redis.pcall('HMGET', KEYS[1], 'm', 'b', 's')
if found.err then
  reason = 'corrupt'
elseif found[1] or found[2] then
  local m, b = found[1], found[2]
  if m and b and string.sub(m, 1, #ARGV[9]) == ARGV[9] and tonumber(string.match(m, '"n":(%d+)')) == #b then
    local fresh = true
    if found[3] and found[3] ~= '' then
      for h, stamp in string.gmatch(found[3], '(%x+)=(%x+)') do
        if redis.call('GET', ARGV[10] .. h) ~= stamp then fresh = false; break end
      end
    end
    if fresh then
      local id = ''
      if ARGV[2] == '1' then
        id = event(KEYS[2], ARGV[6], {'r', ARGV[3], 'h', ARGV[7], 'w', ARGV[8], 'e', m})
      end
      if id then return {'hit', version, m, b, 0, id} end
      return {'hit', version, m, b, 1, ''}
    end
    reason = 'stale_source'
  else
    reason = 'corrupt'
  end
end
if reason ~= '' then redis.call('UNLINK', KEYS[1]) end
local status = 'miss'
if tonumber(ARGV[4]) > 0 then
  local locked = redis.pcall('SET', KEYS[4], ARGV[5], 'NX', 'PX', ARGV[4])
  if type(locked) == 'table' and locked.ok then
    status = 'leader'
  elseif not locked then
    local leader = redis.call('GET', KEYS[4])
    -- Our own token: this very lookup ran before, its reply lost (a retry): we lead.
    if leader == ARGV[5] then status = 'leader'
    elseif leader then return {'follower', version, leader} end
  end
end
local stamps = stamps_of(ARGV[10], ARGV[11], ARGV[12], ARGV[13])
local lost = 0
if ARGV[2] == '1' then
  local result = 'miss'
  if reason == 'stale_source' then result = 'stale_source' end
  if not event(KEYS[2], ARGV[6], {'r', result, 'h', ARGV[7], 'w', ARGV[8], 'x', reason}) then lost = 1 end
end
return {status, version, reason, lost, stamps}
""")

# Release a single-flight lock we own and tell the leader's followers how the flight ended.
# Used inside STORE and RELEASE.
_END_FLIGHT_LUA = """
local function end_flight(lock, flight, token, status, ttl)
  if token == '' then return end
  if redis.call('GET', lock) == token then redis.call('DEL', lock) end
  redis.pcall('XADD', flight, '*', 's', status)
  redis.call('PEXPIRE', flight, ttl)
end
"""

# KEYS: 1 entry, 2 usage stream, 3 policy version copy, 4 lock, 5 flight
# ARGV: 1 snapshot version of the call's plan, 2 ttl ms, 3 meta, 4 body, 5 record, 6 stream maxlen,
#       7 event header, 8 lock token ("" none), 9 stamp key base, 10 sources ("h1,h2" or ""),
#       11 stamps seen when the call began ("s1,s2", "" when there was no lookup), 12 new stamp value,
#       13 stamp ttl ms, 14 flight ttl ms
# Reply: {'stored' | 'stale' | 'stale_source' | 'full' | 'invalid_ttl', version, lost}
# The value and its expiry are written together: there is never an entry without a TTL.
# Write guard: nothing is stored when the policies changed since the call began (the
# answer was made under another policy state) or when one of its sources was invalidated
# meanwhile (its stamp is no longer the one the lookup saw).
STORE = Script("store", _VERSION_LUA + _EVENT_LUA + _END_FLIGHT_LUA + """
local version = version_of(KEYS[3])
local status = 'stored'
if version > tonumber(ARGV[1]) then status = 'stale' end
-- PEXPIRE 0 deletes the key and still answers 1: a TTL below 1 ms is never 'stored'.
if status == 'stored' and (tonumber(ARGV[2]) or 0) < 1 then status = 'invalid_ttl' end
local recorded, missing = {}, {}
if status == 'stored' and ARGV[10] ~= '' then
  local seen = {}
  for stamp in string.gmatch(ARGV[11], '[^,]+') do seen[#seen + 1] = stamp end
  local i = 0
  for h in string.gmatch(ARGV[10], '%x+') do
    i = i + 1
    local stamp = redis.call('GET', ARGV[9] .. h)
    if ARGV[11] ~= '' and stamp ~= seen[i] then status = 'stale_source'; break end
    if not stamp then stamp = ARGV[12]; missing[#missing + 1] = h end
    recorded[#recorded + 1] = h .. '=' .. stamp
  end
end
-- The entry is the script's first write: under maxmemory Redis refuses only a script's
-- first write, so a full Redis refuses the store instead of growing past its limit.
if status == 'stored' then
  local written = redis.pcall('HSET', KEYS[1], 'm', ARGV[3], 'b', ARGV[4], 's', table.concat(recorded, ','))
  if type(written) == 'table' and written.err and string.find(written.err, 'WRONGTYPE') then
    redis.call('UNLINK', KEYS[1])
    written = redis.pcall('HSET', KEYS[1], 'm', ARGV[3], 'b', ARGV[4], 's', table.concat(recorded, ','))
  end
  if type(written) == 'table' and written.err then
    status = 'full'
  elseif redis.call('PEXPIRE', KEYS[1], ARGV[2]) ~= 1 then
    redis.call('UNLINK', KEYS[1])
    status = 'full'
  else
    for _, h in ipairs(missing) do redis.call('SET', ARGV[9] .. h, ARGV[12], 'PX', ARGV[13]) end
    for _, pair in ipairs(recorded) do
      redis.call('PEXPIRE', ARGV[9] .. string.match(pair, '^(%x+)='), ARGV[13], 'GT')
    end
  end
end
local lost = 0
if ARGV[5] == '1' then
  local fields = {'r', 'store', 'h', ARGV[7], 'e', ARGV[3]}
  if status ~= 'stored' then
    local reason = status
    if status == 'stale' then reason = 'policy_changed' elseif status == 'full' then reason = 'redis_full' end
    fields = {'r', 'refused', 'h', ARGV[7], 'x', reason}
  end
  if not event(KEYS[2], ARGV[6], fields) then lost = 1 end
end
if status == 'stored' then end_flight(KEYS[4], KEYS[5], ARGV[8], 'stored', ARGV[14])
else end_flight(KEYS[4], KEYS[5], ARGV[8], 'released', ARGV[14]) end
return {status, version, lost}
""")

# KEYS: 1 lock, 2 flight, 3 usage stream
# ARGV: 1 lock token ("" none), 2 flight status (released | failed), 3 flight ttl ms, 4 record,
#       5 stream maxlen, 6 event header, 7 result ("" no event), 8 reason
# The leader finished without storing (refused, call() raised, the consumer left, no-store).
RELEASE = Script("release", _EVENT_LUA + _END_FLIGHT_LUA + """
end_flight(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if ARGV[4] == '1' and ARGV[7] ~= '' then
  if not event(KEYS[3], ARGV[5], {'r', ARGV[7], 'h', ARGV[6], 'x', ARGV[8]}) then return 1 end
end
return 0
""")

# KEYS: 1 lock, 2 flight
# ARGV: 1 lock token, 2 lock ms, 3 flight ttl ms, 4... chunks (JSON)
# A streaming leader publishes its chunks to followers and keeps its lock alive.
PUBLISH = Script("publish", retry_safe=False, source="""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
for i = 4, #ARGV do
  local ok = redis.pcall('XADD', KEYS[2], '*', 'c', ARGV[i])
  if type(ok) == 'table' and ok.err then return 0 end
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
""")

# KEYS: 1 usage stream, 2 policy version copy
# ARGV: 1 record ("1"/"0"), 2 stream maxlen, 3... the event's fields and values
# Reply: {version, lost}. Events that belong to no other script: a bypass (which also
# learns the policy version: how a bypassing process sees the cache come back), a
# follower that calls the LLM itself, a stream shared live, a hit voided as corrupt.
EVENT = Script("event", _VERSION_LUA + _EVENT_LUA + """
local lost = 0
if ARGV[1] == '1' then
  local fields = {}
  for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
  if not event(KEYS[1], ARGV[2], fields) then lost = 1 end
end
return {version_of(KEYS[2]), lost}
""")

# KEYS: 1 the shard's policy version copy (names the shard's slot; not read)
# ARGV: 1 stamp key base, 2 sources ("h1,h2"), 3 new stamp value, 4 stamp ttl ms
# Reply: the stamps ("s1,s2"). For the write guard of a call whose lookup did not read them
# (a refresh, a shadow hit, a follower that calls the LLM itself after its leader let go).
STAMPS = Script("stamps", _STAMPS_LUA + """
return stamps_of(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
""")

# KEYS: the keys to delete (one slot). An entry found unreadable; a source's stamps.
DELETE = Script("delete", """
for i = 1, #KEYS do redis.call('UNLINK', KEYS[i]) end
return #KEYS
""")

# KEYS: 1 policy version copy; ARGV: 1 new version. Versions only ever grow. Reply: the copy's version.
ANNOUNCE = Script("announce", _VERSION_LUA + """
local current = version_of(KEYS[1])
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]); return tonumber(ARGV[1]) end
return current
""")

# KEYS: 1 lock; ARGV: 1 token, 2 ms. Extend (2 > 0) or delete (2 = 0) a lock we own.
LOCK = Script("lock", """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
""")

ALL = (LOOKUP, STORE, RELEASE, PUBLISH, EVENT, STAMPS, DELETE, ANNOUNCE, LOCK)
