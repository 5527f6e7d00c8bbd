-- Release what orders in review hold in the validation ledger (a reviewer rejected
-- them): their reserved units, single-use coupons and day subsidy. Idempotent: units
-- come back only for holders still listed under sku:<sku>:h (a recount may have
-- settled them), and the order's record is marked released.
-- KEYS[1] a key of the ledger slot (routing); ARGV[1] ledger prefix, ARGV[2..] order keys
-- Returns the number of orders released now
local P = ARGV[1]
local n = 0
for i = 2, #ARGV do
  local key = ARGV[i]
  local rkey = P .. 'o:' .. key
  local raw = redis.call('GET', rkey)
  if raw then
    -- {outcome, extra, reasons, held {sku, qty, ...}, single-use coupons, subsidy bucket,
    --  customer field, goods, coupons (cents), released} (written by rules.lua)
    local d = cmsgpack.unpack(raw)
    if d[1] == 'w' and d[10] == 0 then
      local h = d[4]
      for j = 1, #h, 2 do
        if redis.call('HDEL', P .. 'sku:' .. h[j] .. ':h', key) == 1 then
          redis.call('HINCRBY', P .. 'sku:' .. h[j], 'r', -h[j + 1])
        end
      end
      for _, code in ipairs(d[5]) do
        if redis.call('HGET', P .. 'cpn:' .. code, 'u') == key then redis.call('HDEL', P .. 'cpn:' .. code, 'u') end
      end
      if redis.call('HEXISTS', d[6], d[7] .. '|g') == 1 then
        redis.call('HINCRBY', d[6], d[7] .. '|g', -d[8])
        if d[9] > 0 then redis.call('HINCRBY', d[6], d[7] .. '|c', -d[9]) end
      end
      d[10] = 1
      redis.call('SET', rkey, cmsgpack.pack(d), 'KEEPTTL')
      n = n + 1
    end
  end
end
return n
