-- A returned order's units back into sellable stock, once per order (the ledger slot's half of
-- a return; event.lua recorded the return and what it owes in the order's partition).
-- Per unit line: units the order still holds (its reservation, or its allocation in the
-- warehouse that shipped it, not yet settled by a count) are released: the count still contains
-- them. The rest left the count with the parcel: they go back into the physical stock of the
-- warehouse that shipped them (w:<wh>, and p, their sum), or into p for a SKU not counted per
-- warehouse. A SKU with no stock record is left alone (unknown SKUs hold nothing).
-- Idempotent by order: KEYS[1], a marker string set here (SET NX with a TTL far beyond the
-- retry of a cut-short return): a second call gives nothing back twice.
-- KEYS[1] marker, then per line 4 keys: the SKU's stock hash, its holders hash, its holders
--   hash in the warehouse ('' warehouse: the holders hash again), the warehouse's SKU set
-- ARGV[1] marker TTL (s), ARGV[2] order key, then per line 3 values: sku, qty, warehouse
--   ('' unknown: the SKU's total)
-- Returns {1 given back | 0 already given back, units released, units put back}
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {0, 0, 0} end
local key = ARGV[2]
local released, restocked = 0, 0
local k = 2
for a = 3, #ARGV, 3 do
  local sku, qty, wh = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  local skey, hkey, whkey, skus = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 4
  if redis.call('EXISTS', skey) == 1 then
    local left = qty
    if wh ~= '' then
      local held = tonumber(redis.call('HGET', whkey, key) or '0')
      if held > 0 then
        local q = math.min(held, left)
        if q == held then redis.call('HDEL', whkey, key) else redis.call('HINCRBY', whkey, key, -q) end
        redis.call('HINCRBY', skey, 'r', -q)
        redis.call('HINCRBY', skey, 'a:' .. wh, -q)
        left = left - q
        released = released + q
      end
    end
    local held = tonumber(redis.call('HGET', hkey, key) or '0')
    if held > 0 and left > 0 then
      local q = math.min(held, left)
      if q == held then redis.call('HDEL', hkey, key) else redis.call('HINCRBY', hkey, key, -q) end
      redis.call('HINCRBY', skey, 'r', -q)
      left = left - q
      released = released + q
    end
    if left > 0 then
      local per_wh = false
      for _, f in ipairs(redis.call('HKEYS', skey)) do
        if string.sub(f, 1, 2) == 'w:' then per_wh = true end
      end
      if per_wh and wh ~= '' then
        redis.call('HINCRBY', skey, 'w:' .. wh, left)
        redis.call('SADD', skus, sku)
      end
      redis.call('HINCRBY', skey, 'p', left)
      restocked = restocked + left
    end
  end
end
return {1, released, restocked}
