-- Intake: dedup + queue, atomically, for a batch of orders of one partition.
-- KEYS[1] intake stream, KEYS[2] partition counters, KEYS[3..] status record per order, then
--   (when given: one key more than orders) the partition's pending cancels (cancel.lua): an
--   order whose cancel came first is acknowledged as usual and ends 'cancelled' here, never
--   queued (its cancel's mark goes)
-- ARGV[1] status TTL (s; a record gets its TTL only when its order reaches a final state,
--   contract §5: here, a cancelled one), then per order: order key, payload (msgpack), priority hint
-- Returns per order: 1 queued, 0 duplicate (a status record already exists).
-- The record is created without a TTL: it never expires while its order waits.
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local out = {}
local accepted = 0
local dups = 0
local cancelled = 0
local last = 2 + (#ARGV - 1) / 3
local pending = #KEYS > last and KEYS[#KEYS] or nil
if pending and redis.call('EXISTS', pending) == 0 then pending = nil end  -- (one call when none)
local now_ms = math.floor(now_us / 1000)
for i = 3, last do
  local a = 2 + (i - 3) * 3
  local status = KEYS[i]
  local mark = pending and redis.call('HGET', pending, ARGV[a])
  local deadline, why, note, at
  if mark then deadline, why, note, at = string.match(mark, '^(%d+)\t([^\t]*)\t([^\t]*)\t(%d+)$') end
  if redis.call('EXISTS', status) == 1 then
    out[#out + 1] = 0
    dups = dups + 1
  elseif deadline and tonumber(deadline) > now_ms then
    redis.call('HSET', status, F.status, 'cancelled', F.accepted_at, now_us, F.priority, ARGV[a + 2],
               F.cancel_reason, why, F.cancel_at, at, F.cancel_outcome, 'cancelled', F.cancelled_at, now_us)
    if note ~= '' then redis.call('HSET', status, F.cancel_note, note) end
    redis.call('EXPIRE', status, ARGV[1])  -- final: its TTL counts from now
    redis.call('HDEL', pending, ARGV[a])
    out[#out + 1] = 1
    accepted = accepted + 1
    cancelled = cancelled + 1
  else
    redis.call('HSET', status, F.status, 'accepted', F.accepted_at, now_us, F.priority, ARGV[a + 2])
    redis.call('XADD', KEYS[1], '*', 'k', ARGV[a], 'd', ARGV[a + 1], 'ta', now_us)
    out[#out + 1] = 1
    accepted = accepted + 1
  end
end
if accepted > 0 then redis.call('HINCRBY', KEYS[2], 'accepted', accepted) end
if cancelled > 0 then redis.call('HINCRBY', KEYS[2], 'cancelled', cancelled) end
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dups) end
return out
