-- A reviewer's decision on one order of one partition, atomically: approve moves the
-- parked payload into its ready lane (status validated); reject settles it (status
-- rejected). Only an order still in review is changed, so a double click or two
-- reviewers racing decide once. (Its stock is released afterwards in the ledger slot.)
-- KEYS[1] review zset, KEYS[2] parked payloads, KEYS[3..5] ready lanes vip/new/regular,
-- KEYS[6] counters, KEYS[7] status record
-- ARGV[1] decision (approve | reject), ARGV[2] order key
-- Returns {1, new status} when decided now, else {0, current status or ''}
local status, key = KEYS[7], ARGV[2]
local st = redis.call('HGET', status, 's')
if st ~= 'review' then return {0, st or ''} end
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
if ARGV[1] == 'approve' then
  local payload = redis.call('HGET', KEYS[2], key)
  if not payload then return redis.error_reply('parked payload of ' .. key .. ' is missing') end
  local lanes = {vip = KEYS[3], new = KEYS[4], regular = KEYS[5]}
  local prio = redis.call('HGET', status, 'p')
  local lane = lanes[prio] or KEYS[5]
  -- 'ap': approved by a person; the execute stage does not send it back to review
  redis.call('XADD', lane, '*', 'k', key, 'd', payload, 'ta', redis.call('HGET', status, 'ta') or now_us, 'ap', '1')
  redis.call('HSET', status, 's', 'validated', 'tv', now_us, 'ap', '1')
  redis.call('HINCRBY', KEYS[6], 'validated', 1)
  redis.call('HINCRBY', KEYS[6], 'approved', 1)
  st = 'validated'
else
  redis.call('HSET', status, 's', 'rejected', 'tr', now_us)
  redis.call('HINCRBY', KEYS[6], 'rejected', 1)
  redis.call('HINCRBY', KEYS[6], 'review_rejected', 1)
  st = 'rejected'
end
redis.call('ZREM', KEYS[1], key)
redis.call('HDEL', KEYS[2], key)
return {1, st}
