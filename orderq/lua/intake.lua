-- Intake: dedup + queue, atomically, for a batch of orders of one partition.
-- KEYS[1] intake stream, KEYS[2] partition counters, KEYS[3..] status record per order
-- ARGV[1] status TTL (s; not used here: a record gets its TTL only when its order reaches a
--   final state, contract §5), then per order: order key, payload (msgpack), priority hint
-- Returns per order: 1 queued, 0 duplicate (a status record already exists).
-- The record is created without a TTL: it never expires while its order waits.
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local out = {}
local accepted = 0
local dups = 0
for i = 3, #KEYS do
  local a = 2 + (i - 3) * 3
  local status = KEYS[i]
  if redis.call('EXISTS', status) == 1 then
    out[#out + 1] = 0
    dups = dups + 1
  else
    redis.call('HSET', status, 's', 'accepted', 'ta', now_us, 'p', ARGV[a + 2])
    redis.call('XADD', KEYS[1], '*', 'k', ARGV[a], 'd', ARGV[a + 1], 'ta', now_us)
    out[#out + 1] = 1
    accepted = accepted + 1
  end
end
if accepted > 0 then redis.call('HINCRBY', KEYS[2], 'accepted', accepted) end
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dups) end
return out
