-- Lift region holds for orders of one partition: each still 'held' order goes back to
-- its ready lane by priority (status validated), atomically; executors that know the
-- current holds then execute it (or hold it again if its province was held anew).
-- Only orders whose status is still 'held' move, so concurrent sweeps move each once.
-- A held order's record never expires (contract §5: the TTL counts from a final state); one
-- found missing all the same (deleted by hand, or expired before orderq kept waiting records)
-- is not dropped: its parked payload is the order, never executed (an order leaves the held
-- set in the script that moves it), so its record is written again ('validated') and it
-- goes on like the others, in the regular lane (its priority went with the record).
-- KEYS[1] held zset, KEYS[2] parked payloads, KEYS[3..5] ready lanes vip/new/regular,
-- KEYS[6] counters, KEYS[7..] status record per order; ARGV[1..] order keys
-- Returns the number of orders moved
local lanes = {vip = KEYS[3], new = KEYS[4], regular = KEYS[5]}
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local n, recreated = 0, 0
for i = 7, #KEYS do
  local key, status = ARGV[i - 6], KEYS[i]
  local st = redis.call('HGET', status, F.status)
  local payload = redis.call('HGET', KEYS[2], key)
  local since = not st and payload and redis.call('ZSCORE', KEYS[1], key)
  if since then  -- (its accept time went with the record: only the time it was held is known)
    redis.call('HSET', status, F.status, 'held', F.held_at, string.format('%.0f', tonumber(since)))
    recreated = recreated + 1
    st = 'held'
  end
  if st == 'held' and payload then
    local v = redis.call('HMGET', status, F.priority, F.accepted_at, F.approved)
    local lane = lanes[v[1]] or KEYS[5]
    local rid
    if v[3] then  -- approved by a person before it was held: it stays approved
      rid = redis.call('XADD', lane, '*', 'k', key, 'd', payload, 'ta', v[2] or now_us, 'ap', v[3])
    else
      rid = redis.call('XADD', lane, '*', 'k', key, 'd', payload, 'ta', v[2] or now_us)
    end
    local lane_no = ({vip = '1', new = '2'})[v[1]] or '3'  -- F.ready_entry: where a cancel finds the entry
    redis.call('HSET', status, F.status, 'validated', F.ready_entry, lane_no .. '|' .. rid)
    redis.call('PERSIST', status)  -- waiting again (a record from before may carry a TTL)
    redis.call('ZREM', KEYS[1], key)
    redis.call('HDEL', KEYS[2], key)
    n = n + 1
  elseif not st then
    -- no record and no payload: nothing of the order is left to send on
    redis.call('ZREM', KEYS[1], key)
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[6], 'unheld', n) end
if recreated > 0 then redis.call('HINCRBY', KEYS[6], 'records_recreated', recreated) end
return n
