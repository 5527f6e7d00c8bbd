-- A reviewer's decision on one order of one partition, atomically: approve moves the
-- parked payload into its ready lane (status validated); reject settles it (status
-- rejected). Only an order still in review is changed, so a double click or two
-- reviewers racing decide once. (Its stock is released afterwards in the ledger slot.)
-- The record's TTL counts from the final state only (contract §5): approve leaves it without
-- one (the order waits for execution), reject starts it. An order still listed for review
-- whose record is missing (deleted by hand, or expired before orderq kept waiting records)
-- is still decided: it never executed (an order leaves the review set in the script that
-- decides it), so its record is written again (an approved one goes to the regular lane:
-- its priority went with the record).
-- KEYS[1] review zset, KEYS[2] parked payloads, KEYS[3..5] ready lanes vip/new/regular,
-- KEYS[6] counters, KEYS[7] status record
-- ARGV[1] decision (approve | reject), ARGV[2] order key, ARGV[3] status TTL (s)
-- Returns {1, new status} when decided now, else {0, current status or ''}
local status, key = KEYS[7], ARGV[2]
local st = redis.call('HGET', status, F.status)
local lost = not st and redis.call('ZSCORE', KEYS[1], key)
if lost then st = 'review' end
if st ~= 'review' then return {0, st or ''} end
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
if ARGV[1] == 'approve' then
  local payload = redis.call('HGET', KEYS[2], key)
  if not payload then return redis.error_reply('parked payload of ' .. key .. ' is missing') end
  local lanes = {vip = KEYS[3], new = KEYS[4], regular = KEYS[5]}
  local prio = redis.call('HGET', status, F.priority)
  local lane = lanes[prio] or KEYS[5]
  -- 'ap': approved by a person; the execute stage does not send it back to review
  local rid = redis.call('XADD', lane, '*', 'k', key, 'd', payload, 'ta', redis.call('HGET', status, F.accepted_at) or now_us, 'ap', '1')
  local lane_no = ({vip = '1', new = '2'})[prio] or '3'  -- F.ready_entry: where a cancel finds the entry
  redis.call('HSET', status, F.status, 'validated', F.validated_at, now_us, F.approved, '1', F.ready_entry, lane_no .. '|' .. rid)
  redis.call('PERSIST', status)  -- (a record from before may carry a TTL)
  redis.call('HINCRBY', KEYS[6], 'validated', 1)
  redis.call('HINCRBY', KEYS[6], 'approved', 1)
  st = 'validated'
else
  redis.call('HSET', status, F.status, 'rejected', F.rejected_at, now_us)
  redis.call('EXPIRE', status, ARGV[3])
  redis.call('HINCRBY', KEYS[6], 'rejected', 1)
  redis.call('HINCRBY', KEYS[6], 'review_rejected', 1)
  st = 'rejected'
end
redis.call('ZREM', KEYS[1], key)
redis.call('HDEL', KEYS[2], key)
if lost then redis.call('HINCRBY', KEYS[6], 'records_recreated', 1) end
return {1, st}
