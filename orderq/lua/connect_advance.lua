-- Move a pull connector's cursor forward, never back, and only while the caller holds its
-- lease: a process that lost the lease while it read a window never moves its successor's
-- cursor (connect/state.py).
-- KEYS[1] the connector's lease, KEYS[2] its cursor (ms), KEYS[3] its state hash (one slot:
--   keys.connector_key tags them with the connector's name)
-- ARGV[1] the holder's token, ARGV[2] the new cursor (ms), ARGV[3] now (ms), then the state
--   hash's fields for the last poll and the last success (orderq/connectors.py)
-- Returns 1 when the cursor is where ARGV[2] asks or further, -1 when the lease is not the caller's
local lease, cursor, state = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', lease) ~= ARGV[1] then
  return -1
end
local cur = tonumber(redis.call('GET', cursor) or '0')
if tonumber(ARGV[2]) > cur then
  redis.call('SET', cursor, ARGV[2])
end
redis.call('HSET', state, ARGV[4], ARGV[3], ARGV[5], ARGV[3])
return 1
