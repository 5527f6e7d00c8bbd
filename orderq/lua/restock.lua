-- Set physical stock (a fresh warehouse count) and settle, once each, the reservations of
-- orders that no longer need them: executed orders (their goods left with the pick, so
-- the new count no longer contains them) and orders gone or rejected. A holder settled
-- here is removed from sku:<sku>:h, so a later release cannot return its units twice.
-- KEYS[1] a key of the ledger slot (routing); ARGV[1] ledger prefix, then per SKU:
--   sku, physical ('-': leave it), n, order key x n (holders to settle)
-- Returns per SKU {physical, reserved}
local P = ARGV[1]
local out = {}
local a = 2
while a <= #ARGV do
  local sku, physical, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local skey, hkey = P .. 'sku:' .. sku, P .. 'sku:' .. sku .. ':h'
  for i = a + 3, a + 2 + n do
    local qty = redis.call('HGET', hkey, ARGV[i])
    if qty then
      redis.call('HDEL', hkey, ARGV[i])
      redis.call('HINCRBY', skey, 'r', -tonumber(qty))
    end
  end
  if physical ~= '-' then redis.call('HSET', skey, 'p', physical) end
  local v = redis.call('HMGET', skey, 'p', 'r')
  out[#out + 1] = {tonumber(v[1] or 0), tonumber(v[2] or 0)}
  a = a + 3 + n
end
return out
