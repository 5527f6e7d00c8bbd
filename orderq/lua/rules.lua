-- The validation ledger for a batch: stock, coupons, subsidy cap, IP and duplicate
-- windows, decided and held per order atomically (all lines or none; a coupon is not
-- burnt by an order that is short of stock, nor stock held by one whose coupon is gone).
-- Every key lies under ARGV[1]'s hash tag (one slot; KEYS[1] names it for routing), and
-- names follow orderq/keys.py: sku:<sku> {p,r}, sku:<sku>:h, cpn:<code>, sub:<...>,
-- ip:<ip>, dup:<fingerprint>, o:<order key>.
-- Idempotent per order: what was decided is stored under o:<order key> in the same call,
-- and a redelivered order gets that decision back without holding anything twice.
-- ARGV[1] prefix, [2] stock buffer (ppm), [3] unknown-SKU policy (review|reject|allow),
--   [4] IP orders per hour, [5] IP window (ms), [6] IP burst weight, [7] review score,
--   [8] duplicate window (ms), [9] subsidy cap (basis points), [10] review record TTL (s),
--   [11] replay record TTL (s), [12] subsidy TTL (s), then per order:
--   key, channel, accept time (ms), base score, pre-rejected (0|1), ip, fingerprint,
--   subsidy key suffix, goods (cents), coupons (cents), n lines, (sku, qty) x n,
--   n coupons, code x n
-- Returns per order {outcome v|w|r, extra score, reason...}
local P = ARGV[1]
local ppm, policy = tonumber(ARGV[2]), ARGV[3]
local ip_limit, ip_window, ip_weight = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local review_score, dup_window, cap_bp = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local review_ttl, replay_ttl, sub_ttl = ARGV[10], ARGV[11], ARGV[12]
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
local touched_ip, touched_sub = {}, {}
local out = {}
local a = 13
while a <= #ARGV do
  local key, channel, ta = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local base, pre, ip, fp = tonumber(ARGV[a + 3]), ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local sub, goods, coupon_total = ARGV[a + 7], tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local nlines = tonumber(ARGV[a + 10])
  local lines_at = a + 11
  local ncoupons = tonumber(ARGV[lines_at + 2 * nlines])
  local codes_at = lines_at + 2 * nlines + 1
  a = codes_at + ncoupons
  local rkey = P .. 'o:' .. key
  local old = redis.call('GET', rkey)
  if old then
    local d = cjson.decode(old)
    local row = {d.o, d.x}
    for _, r in ipairs(d.r) do row[#row + 1] = r end
    out[#out + 1] = row
  else
    local reasons, reject, review, extra = {}, pre == '1', false, 0
    -- stock: every line checked, held below only if nothing rejects the order
    local hold = {}
    for i = 0, nlines - 1 do
      local sku, qty = ARGV[lines_at + 2 * i], tonumber(ARGV[lines_at + 2 * i + 1])
      local v = redis.call('HMGET', P .. 'sku:' .. sku, 'p', 'r')
      if not v[1] then
        if policy == 'reject' then
          reject = true
          reasons[#reasons + 1] = 'unknown_sku:' .. sku
        elseif policy == 'review' then
          review = true
          reasons[#reasons + 1] = 'unknown_sku:' .. sku
        end
      else
        local sellable = math.floor(tonumber(v[1]) * ppm / 1000000) - tonumber(v[2] or 0)
        if qty > sellable then
          reject = true
          reasons[#reasons + 1] = 'out_of_stock:' .. sku
        else
          hold[#hold + 1] = sku
          hold[#hold + 1] = qty
        end
      end
    end
    -- coupons known to orderq: platform, expiry, single use
    local use, seen = {}, {}
    local cross, expired, used = false, false, false
    for i = 0, ncoupons - 1 do
      local code = ARGV[codes_at + i]
      local c = redis.call('HMGET', P .. 'cpn:' .. code, 'pf', 'x', 'one', 'u')
      if c[1] then
        if c[1] ~= channel then cross = true end
        local x = tonumber(c[2] or 0)
        if x > 0 and x < ta then expired = true end
        if c[3] == '1' then
          if seen[code] or (c[4] and c[4] ~= key) then used = true else use[#use + 1] = code end
        end
      end
      seen[code] = true
    end
    if cross then reasons[#reasons + 1] = 'coupon_cross_platform' end
    if expired then reasons[#reasons + 1] = 'coupon_expired' end
    if used then reasons[#reasons + 1] = 'coupon_used' end
    reject = reject or cross or expired or used
    -- subsidy: the customer's coupons in one day stay within the cap of their goods
    local skey = ''
    if sub ~= '' then
      skey = P .. 'sub:' .. sub
      if coupon_total > 0 then
        local s = redis.call('HMGET', skey, 'g', 'c')
        local g, c = tonumber(s[1] or 0) + goods, tonumber(s[2] or 0) + coupon_total
        if c * 10000 > cap_bp * g then
          reject = true
          reasons[#reasons + 1] = 'subsidy_cap'
        end
      end
    end
    -- risk windows count every order, whatever its outcome; the member is the order key
    if ip ~= '' then
      local z = P .. 'ip:' .. ip
      redis.call('ZADD', z, 'NX', ta, key)
      if redis.call('ZCOUNT', z, ta - ip_window + 1, ta) > ip_limit then
        extra = extra + ip_weight
        reasons[#reasons + 1] = 'risk_ip_burst'
      end
      touched_ip[z] = true
    end
    if fp ~= '' and dup_window > 0 then
      local z = P .. 'dup:' .. fp
      local near = redis.call('ZRANGEBYSCORE', z, ta - dup_window, ta + dup_window, 'LIMIT', 0, 4)
      local n = 0
      for _, other in ipairs(near) do
        if other ~= key and n < 3 then
          n = n + 1
          review = true
          reasons[#reasons + 1] = 'duplicate_suspect:' .. other
        end
      end
      redis.call('ZADD', z, 'NX', ta, key)
      redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. (now_ms - 2 * dup_window))
      redis.call('PEXPIRE', z, 2 * dup_window)
    end
    if base + extra >= review_score then review = true end
    local outcome = reject and 'r' or (review and 'w' or 'v')
    local rec = {o = outcome, x = extra, r = reasons}
    if not reject then
      for i = 1, #hold, 2 do
        local sku, qty = hold[i], hold[i + 1]
        redis.call('HINCRBY', P .. 'sku:' .. sku, 'r', qty)
        redis.call('HSET', P .. 'sku:' .. sku .. ':h', key, qty)
      end
      for _, code in ipairs(use) do redis.call('HSET', P .. 'cpn:' .. code, 'u', key) end
      if skey ~= '' then
        redis.call('HINCRBY', skey, 'g', goods)
        if coupon_total > 0 then redis.call('HINCRBY', skey, 'c', coupon_total) end
        touched_sub[skey] = true
      end
      rec.h, rec.c, rec.d, rec.g, rec.k = hold, use, skey, goods, coupon_total
    end
    redis.call('SET', rkey, cjson.encode(rec), 'EX', outcome == 'w' and review_ttl or replay_ttl)
    local row = {outcome, extra}
    for _, r in ipairs(reasons) do row[#row + 1] = r end
    out[#out + 1] = row
  end
end
for z in pairs(touched_ip) do
  redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. (now_ms - 2 * ip_window))
  redis.call('PEXPIRE', z, 2 * ip_window)
end
for k in pairs(touched_sub) do redis.call('EXPIRE', k, sub_ttl) end
return out
