-- Give a lease back (connect/state.py), only while it is still the caller's: a holder whose
-- lease ran out and was taken over must not delete its successor's.
-- KEYS[1] the lease string; ARGV[1] the holder's token
-- Returns 1 when deleted, else 0
local lease = KEYS[1]
if redis.call('GET', lease) == ARGV[1] then
  return redis.call('DEL', lease)
end
return 0
