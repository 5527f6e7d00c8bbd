-- Cancel one order of one partition (contract §5), atomically with every stage's hand-off:
-- the stage scripts (handoff.lua, execute.lua) run in this same slot and skip, acknowledging
-- it, an entry whose order is 'cancelled' here, so a cancel decided here means the order never
-- executes, whatever batch it is in.
-- What the order holds in the validation ledger (another slot) is released by
-- orderq/lifecycle.py after this script, from a "release owed" record written here (review,
-- held: its parked payload; validated: its ready-lane entry's) and by the stage script that skips
-- its entry (accepted, validated: what validation or routing took meanwhile is released then);
-- the record goes once the ledger released it ('settled').
-- op 'cancel':
--   KEYS[1] status record, KEYS[2] counters, KEYS[3] pending cancels (hash: order key ->
--   "<deadline ms>\t<reason>\t<note>\t<at us>", for orders not seen yet), KEYS[4] releases owed
--   (hash: order key -> "<seq>|<accept us>|<payload>"), KEYS[5] review zset, KEYS[6] held zset,
--   KEYS[7] parked payloads, KEYS[8] the wms.intercept outbox stream, KEYS[9..11] ready lanes
--   vip/new/regular (a validated order's entry, F.ready_entry, says what it holds at once),
--   KEYS[12] the order's payload key (keys.Partition.payload: an executed order's, what the
--   intercept carries), whose TTL is the record's
--   ARGV[1] 'cancel', [2] order key, [3] reason, [4] note, [5] status TTL (s), [6] intercept
--   outbox maxlen (0: never trimmed, a dispatcher deletes what it delivered)
--   Returns {answer, release owed now (0|1)}; answer: cancelled | intercepting | cancel_pending |
--   too_late | not_cancellable (rejected: nothing to cancel). A repeat answers the same and
--   changes nothing.
-- op 'settled': KEYS[1] releases owed; ARGV[2..] pairs of order key and its record as the
--   release read it: deleted only if unchanged (a stage may have owed a new release since).
--   Returns the number deleted.
if ARGV[1] == 'settled' then
  local n = 0
  for a = 2, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[a]) == ARGV[a + 1] then
      redis.call('HDEL', KEYS[1], ARGV[a])
      n = n + 1
    end
  end
  return n
end

local status, counters, pending, owed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, reason, note, ttl, maxlen = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now_ms = math.floor(now_us / 1000)
local st = redis.call('HGET', status, F.status)
local FINAL_EARLY = {accepted = true, validated = true, review = true, held = true}
local LATE = {shipped = true, delivered = true, return_requested = true, returned = true}

if not st then
  -- the cancel overtook its order: kept as a mark the intake script reads when the order comes
  local have = redis.call('HGET', pending, key)
  if have and tonumber(string.match(have, '^(%d+)')) > now_ms then return {'cancel_pending', 0} end
  local deadline = string.format('%.0f', now_ms + ttl * 1000)  -- (Lua's '..' writes large numbers as 1e+15)
  redis.call('HSET', pending, key, deadline .. '\t' .. reason .. '\t' .. note .. '\t' .. string.format('%.0f', now_us))
  -- the hash lives as long as its youngest mark; each mark also carries its own deadline, and a
  -- few expired ones are dropped per new mark (fields have no TTL of their own before Redis 7.4)
  redis.call('EXPIRE', pending, ttl)
  local some = redis.call('HRANDFIELD', pending, 8, 'WITHVALUES')
  for i = 1, #some, 2 do
    if tonumber(string.match(some[i + 1], '^(%d+)') or 0) <= now_ms then redis.call('HDEL', pending, some[i]) end
  end
  redis.call('HINCRBY', counters, 'cancel_pending', 1)
  return {'cancel_pending', 0}
end
if st == 'cancelled' or st == 'intercepting' then return {st, 0} end
if LATE[st] then return {'too_late', 0} end
if st == 'rejected' then return {'not_cancellable', 0} end

redis.call('HSET', status, F.cancel_reason, reason, F.cancel_at, now_us)
if note ~= '' then redis.call('HSET', status, F.cancel_note, note) end
if FINAL_EARLY[st] then
  redis.call('HSET', status, F.status, 'cancelled', F.cancel_outcome, 'cancelled', F.cancelled_at, now_us)
  redis.call('HINCRBY', counters, 'cancelled', 1)
  if st == 'review' or st == 'held' then
    -- parked here: it leaves its set now, and its payload says what it holds in the ledger
    local payload = redis.call('HGET', KEYS[7], key)
    redis.call('ZREM', st == 'review' and KEYS[5] or KEYS[6], key)
    redis.call('HDEL', KEYS[7], key)
    redis.call('EXPIRE', status, ttl)  -- nothing of it is left in a stream: final from now
    if payload then
      local seq = redis.call('HINCRBY', counters, 'cancel_seq', 1)
      local ta = redis.call('HGET', status, F.accepted_at) or '0'
      redis.call('HSET', owed, key, seq .. '|' .. ta .. '|' .. payload)
      return {'cancelled', 1}
    end
    return {'cancelled', 0}
  end
  -- its entry is still in the intake or a ready lane: the record keeps no TTL until the stage
  -- skips the entry (a record gone before that would let the entry pass as a new order)
  redis.call('PERSIST', status)
  local re = st == 'validated' and redis.call('HGET', status, F.ready_entry)
  local lane, id = string.match(re or '', '^(%d)|(.+)$')
  local found = lane and redis.call('XRANGE', KEYS[8 + tonumber(lane)], id, id)[1]
  if found then
    local f = found[2]
    for i = 1, #f, 2 do
      if f[i] == 'd' then
        local seq = redis.call('HINCRBY', counters, 'cancel_seq', 1)
        local ta = redis.call('HGET', status, F.accepted_at) or '0'
        redis.call('HSET', owed, key, seq .. '|' .. ta .. '|' .. f[i + 1])
        return {'cancelled', 1}
      end
    end
  end
  return {'cancelled', 0}
end
-- executed: wms.pick went out. The warehouse is asked to stop the parcel, once in effect; the
-- order waits for its answer (the events endpoint: intercepted -> cancelled, else shipped)
redis.call('HSET', status, F.status, 'intercepting', F.cancel_outcome, 'intercepting')
redis.call('PERSIST', status)
redis.call('PERSIST', KEYS[12])
if redis.call('HSETNX', status, F.action .. 'wms.intercept', 'done') == 1 then
  local fid = redis.call('HGET', status, F.fulfilment_id) or ''
  -- (a record written before payloads had their own key keeps its payload in the hash)
  local payload = redis.call('GET', KEYS[12]) or redis.call('HGET', status, F.payload) or ''
  local entry = {'*', 'k', key, 'f', fid, 'd', payload, 'c', reason}
  if maxlen ~= '0' then
    redis.call('XADD', KEYS[8], 'MAXLEN', '~', maxlen, unpack(entry))
  else
    redis.call('XADD', KEYS[8], unpack(entry))
  end
  redis.call('HINCRBY', status, F.applied .. 'wms.intercept', 1)  -- apply count: the audit's duplicate check
end
redis.call('HINCRBY', counters, 'intercepting', 1)
return {'intercepting', 0}
