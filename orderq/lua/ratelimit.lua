-- Token buckets per channel, shared by every ingress process. One call serves all the
-- requests an ingress process gathered in one event-loop turn, in arrival order.
-- KEYS[1..] bucket hash per request (same tag: one slot)
-- ARGV per request 3 values: tokens asked, rate (tokens/s), burst
-- Returns per request: 0 granted, else seconds to wait before retrying
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local state = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local n, rate, burst = tonumber(ARGV[i * 3 - 2]), tonumber(ARGV[i * 3 - 1]), tonumber(ARGV[i * 3])
  local s = state[key]
  if not s then
    local h = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = tonumber(h[1]) or burst
    local ts = tonumber(h[2]) or now
    s = {tokens = math.min(burst, tokens + math.max(0, now - ts) * rate), rate = rate, burst = burst}
    state[key] = s
  end
  if s.tokens >= n then
    s.tokens = s.tokens - n
    out[i] = 0
  else
    out[i] = math.max(1, math.ceil((n - s.tokens) / rate))
  end
end
for key, s in pairs(state) do
  redis.call('HSET', key, 'tokens', tostring(s.tokens), 'ts', tostring(now))
  redis.call('EXPIRE', key, math.ceil(s.burst / s.rate) + 60)
end
return out
