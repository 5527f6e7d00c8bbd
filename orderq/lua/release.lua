-- Release what orders in review hold in the validation ledger (a reviewer rejected them, or a
-- dead letter was discarded): their reserved units, single-use coupons and day subsidy.
-- Idempotent: units come back only for holders still listed in a SKU's holders hash (a recount
-- may have settled them), and the order's record is marked released.
-- Every key comes in KEYS, built by orderq/ledger/stock.py from the record as read just before
-- (a record changes only by its released mark, so the keys stay those of the record).
-- Per order, KEYS: its ReviewHold record (keys.ledger_key), its day's subsidy hash, then per
--   single-use coupon its coupon hash, then per held SKU its stock hash and holders hash;
-- ARGV: its order key, the number of coupons, the number of held SKUs.
-- Returns the number of orders released now
local H = ReviewHold  -- orderq/wire.py (its table comes with the script: wire.with_tables)
local n = 0
local k = 1
for a = 1, #ARGV, 3 do
  local key, coupons, skus = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local rkey, sub = KEYS[k], KEYS[k + 1]
  local raw = redis.call('GET', rkey)
  if raw then
    local d = cmsgpack.unpack(raw)
    local h, used = d[H.held], d[H.coupons]
    if #used ~= coupons or #h ~= 2 * skus then
      return redis.error_reply('the ledger record of ' .. key .. ' changed since its keys were read')
    end
    if d[H.outcome] == 'w' and d[H.released] == 0 then
      for j, code in ipairs(used) do
        local ckey = KEYS[k + 1 + j]
        if redis.call('HGET', ckey, 'u') == key then redis.call('HDEL', ckey, 'u') end
      end
      local at = k + 2 + coupons
      for j = 1, #h, 2 do
        if redis.call('HDEL', KEYS[at + 1], key) == 1 then
          redis.call('HINCRBY', KEYS[at], 'r', -h[j + 1])
        end
        at = at + 2
      end
      local who = d[H.customer]
      if redis.call('HEXISTS', sub, who .. '|g') == 1 then
        redis.call('HINCRBY', sub, who .. '|g', -d[H.goods])
        if d[H.coupon_cents] > 0 then redis.call('HINCRBY', sub, who .. '|c', -d[H.coupon_cents]) end
      end
      d[H.released] = 1
      redis.call('SET', rkey, cmsgpack.pack(d), 'KEEPTTL')
      n = n + 1
    end
  end
  k = k + 2 + coupons + 2 * skus
end
return n
