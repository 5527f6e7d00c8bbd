-- A lease (a pull connector's, or the watched import folder's: connect/state.py): take it when
-- free, or renew it when ours; one script, no check-then-write across round trips.
-- KEYS[1] the lease string (keys.connector_key(name, 'lease') or keys.IMPORT_LEASE_KEY)
-- ARGV[1] the holder's token, ARGV[2] the lease's length in ms
-- Returns 1 when the caller holds the lease now, else 0
local lease = KEYS[1]
local cur = redis.call('GET', lease)
if not cur then
  redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', lease, ARGV[2])
  return 1
end
return 0
