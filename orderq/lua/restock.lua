-- Set physical stock (a fresh count) and settle, once each, the reservations of orders
-- that no longer need them: executed orders (their goods left with the pick, so the new
-- count no longer contains them) and orders gone or rejected. A holder settled here is
-- removed from its holders hash, so a later release cannot return its units twice.
-- Per warehouse: a SKU's stock hash holds w:<wh>, a warehouse's count, and p their sum (the
-- sellable total stays one number); units the execute stage allocated in a warehouse
-- (a:<wh>, its warehouse holders hash) are settled by that warehouse's count.
-- Every key comes in KEYS, built by orderq/ledger/stock.py (restock_call): per step its SKU's
-- stock hash, the holders hash it settles (the SKU's, or the SKU's in the warehouse), and for a
-- warehouse's count that warehouse's SKU set (what its removal checks, retire.lua).
-- ARGV per step: sku, warehouse ('' the total), physical ('-': leave it), n, order key x n
--   (holders to settle)
-- Returns per step {physical, reserved} (totals)
local out = {}
local a, k = 1, 1
while a <= #ARGV do
  local sku, wh, physical, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local skey, hkey = KEYS[k], KEYS[k + 1]
  for i = a + 4, a + 3 + n do
    local qty = redis.call('HGET', hkey, ARGV[i])
    if qty then
      redis.call('HDEL', hkey, ARGV[i])
      redis.call('HINCRBY', skey, 'r', -tonumber(qty))
      if wh ~= '' then redis.call('HINCRBY', skey, 'a:' .. wh, -tonumber(qty)) end
    end
  end
  if physical ~= '-' then
    if wh == '' then
      redis.call('HSET', skey, 'p', physical)
    else
      redis.call('HSET', skey, 'w:' .. wh, physical)
      redis.call('SADD', KEYS[k + 2], sku)
      local all = redis.call('HGETALL', skey)
      local total = 0
      for i = 1, #all, 2 do
        if string.sub(all[i], 1, 2) == 'w:' then total = total + tonumber(all[i + 1]) end
      end
      redis.call('HSET', skey, 'p', total)
    end
  end
  local v = redis.call('HMGET', skey, 'p', 'r')
  out[#out + 1] = {tonumber(v[1] or 0), tonumber(v[2] or 0)}
  a = a + 4 + n
  k = k + (wh == '' and 2 or 3)
end
return out
