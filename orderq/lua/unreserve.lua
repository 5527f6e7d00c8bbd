-- Release what cancelled orders hold in the validation ledger: reserved units (in total, and
-- allocated in a warehouse by routing), single-use coupons, and their share of the customer's
-- day subsidy totals. Run by orderq/lifecycle.py after the partition script that cancelled the
-- order, or skipped its entry, wrote a "release owed" record (cancel.lua).
-- Idempotent, and safe to run again whenever the order holds something new (validation or
-- routing that ran after the cancel): units and coupons come back only from holders still
-- listed (each HDEL frees them once); the subsidy, which has no holder, once per order, guarded
-- by the order's release mark (SET NX) and by its review record's released mark.
-- Every key comes in KEYS, built by orderq/lifecycle.py from the order:
-- Per order, KEYS: its release mark, its review record (keys.ledger_key), its day's subsidy
--   hash, per coupon its coupon hash, per SKU its stock hash and holders hash, then per SKU and
--   per warehouse that SKU's holders hash in the warehouse;
-- ARGV[1] release mark TTL (s), then per order: order key, customer field ("<channel>:<customer
--   id>"), goods cents, coupon cents, number of coupons, number of SKUs, number of warehouses,
--   the warehouse ids.
-- Returns the units released now.
local H = ReviewHold  -- orderq/wire.py (its table comes with the script: wire.with_tables)
local units = 0
local k, a = 1, 2
while a <= #ARGV do
  local key, who, goods, coupon_cents = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local nc, ns, nw = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local whs = {}
  for i = 1, nw do whs[i] = ARGV[a + 6 + i] end
  a = a + 7 + nw
  local mark, rec, sub = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  for _ = 1, nc do
    if redis.call('HGET', KEYS[k], 'u') == key then redis.call('HDEL', KEYS[k], 'u') end
    k = k + 1
  end
  local stock = {}
  for i = 1, ns do
    local skey, hkey = KEYS[k], KEYS[k + 1]
    stock[i] = skey
    local q = redis.call('HGET', hkey, key)
    if q then
      redis.call('HDEL', hkey, key)
      redis.call('HINCRBY', skey, 'r', -tonumber(q))
      units = units + tonumber(q)
    end
    k = k + 2
  end
  for i = 1, ns do
    for _, wh in ipairs(whs) do
      local q = redis.call('HGET', KEYS[k], key)
      if q then
        redis.call('HDEL', KEYS[k], key)
        redis.call('HINCRBY', stock[i], 'r', -tonumber(q))
        redis.call('HINCRBY', stock[i], 'a:' .. wh, -tonumber(q))
        units = units + tonumber(q)
      end
      k = k + 1
    end
  end
  if redis.call('SET', mark, '1', 'NX', 'EX', ARGV[1]) then
    local owed = true
    local raw = redis.call('GET', rec)
    if raw then  -- in review since validation: release.lua may have settled it already
      local d = cmsgpack.unpack(raw)
      owed = d[H.released] == 0
      d[H.released] = 1
      redis.call('SET', rec, cmsgpack.pack(d), 'EX', ARGV[1])
    end
    if owed and redis.call('HEXISTS', sub, who .. '|g') == 1 then
      redis.call('HINCRBY', sub, who .. '|g', -goods)
      if coupon_cents > 0 then redis.call('HINCRBY', sub, who .. '|c', -coupon_cents) end
    end
  end
end
return units
