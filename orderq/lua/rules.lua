-- The validation ledger for a batch: the customer's first order (priority 'new'), stock,
-- coupons, the subsidy cap, the IP and duplicate windows, decided and held per order
-- atomically (all lines or none; no coupon is burnt by an order short of stock, and no
-- stock is held by one whose coupon is gone).
-- Every key lies under ARGV[1]'s hash tag (one slot; KEYS[1] names it for routing), and
-- names follow orderq/keys.py: sku:<sku> {p, r}, sku:<sku>:h, cpn:<code>, sub:<...>,
-- cust:<...>, ip:<ip>, dup:<fingerprint>, o:<order key>.
-- Idempotent per order: the decision and what it holds are stored under o:<order key>
-- (SET NX GET) before anything is held, so a redelivered order gets its first decision
-- back and holds nothing twice; window entries are keyed by order key.
-- Cheap per order: the batch comes as one msgpack argument, the answer goes back as one
-- msgpack string, and stock is read once and written once per SKU per batch.
-- ARGV[1] prefix, [2] stock buffer (ppm), [3] unknown-SKU policy (review|reject|allow),
--   [4] IP orders per hour, [5] IP window (ms), [6] IP burst weight, [7] review score,
--   [8] duplicate window (ms, 0 off), [9] subsidy cap (basis points), [10] review record
--   TTL (s), [11] replay record TTL (s), [12] subsidy TTL (s), [13] customer TTL (s),
--   [14] msgpack array of orders, each: {key, channel, customer id, accept time (ms),
--   base score, pre-rejected (0|1), ip, fingerprint, day, goods (cents), coupons (cents),
--   {sku, qty, ...}, {code, ...}}
-- Returns msgpack: per order {outcome v|w|r, extra score, first order (0|1), reason...}
local P = ARGV[1]
local ppm, policy = tonumber(ARGV[2]), ARGV[3]
local ip_limit, ip_window, ip_weight = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local review_score, dup_window, cap_bp = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local review_ttl, replay_ttl, sub_ttl, cust_ttl = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local orders = cmsgpack.unpack(ARGV[14])

-- per-batch caches: read once, written once at the end
local stock = {}     -- sku -> {p = physical or false, r = reserved, d = delta, h = {holder, qty, ...}}
local subs = {}      -- sub key -> {g, c, dg, dc}
local ips = {}       -- ip zset -> last accept time seen
local function stock_of(sku)
  local s = stock[sku]
  if not s then
    local v = redis.call('HMGET', P .. 'sku:' .. sku, 'p', 'r')
    s = {p = v[1] and tonumber(v[1]), r = tonumber(v[2] or 0), d = 0, h = {}}
    stock[sku] = s
  end
  return s
end

local out = {}
for n, o in ipairs(orders) do
  local key, channel, cust, ta = o[1], o[2], o[3], o[4]
  local base, pre, ip, fp, day = o[5], o[6], o[7], o[8], o[9]
  local goods, coupon_total, lines, codes = o[10], o[11], o[12], o[13]
  local prev = redis.call('SET', P .. 'cust:' .. channel .. ':' .. cust, key, 'NX', 'GET', 'EX', cust_ttl)
  local first = (not prev or prev == key) and 1 or 0
  local reasons, reject, review, extra = {}, pre == 1, false, 0
  -- stock: every line checked; held below only if nothing rejects the order
  local hold = {}
  for i = 1, #lines, 2 do
    local sku, qty = lines[i], lines[i + 1]
    local s = stock_of(sku)
    if not s.p then
      if policy ~= 'allow' then
        if policy == 'reject' then reject = true else review = true end
        reasons[#reasons + 1] = 'unknown_sku:' .. sku
      end
    elseif redis.call('HEXISTS', P .. 'sku:' .. sku .. ':h', key) == 1 then
      -- this order holds the SKU already (a replay older than its record): hold nothing more
    elseif qty > math.floor(s.p * ppm / 1000000) - s.r then
      reject = true
      reasons[#reasons + 1] = 'out_of_stock:' .. sku
    else
      hold[#hold + 1] = sku
      hold[#hold + 1] = qty
    end
  end
  -- coupons orderq knows: platform, expiry at the accept time, single use
  local use, seen = {}, {}
  local cross, expired, used = false, false, false
  for _, code in ipairs(codes) do
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
  -- subsidy: a customer's coupons in one day stay within the cap of their day's goods
  local skey = P .. 'sub:' .. channel .. ':' .. cust .. ':' .. day
  local sub = subs[skey]
  if not sub and coupon_total > 0 then
    local v = redis.call('HMGET', skey, 'g', 'c')
    sub = {tonumber(v[1] or 0), tonumber(v[2] or 0), 0, 0}
    subs[skey] = sub
  end
  if coupon_total > 0 and (sub[2] + sub[4] + coupon_total) * 10000 > cap_bp * (sub[1] + sub[3] + goods) then
    reject = true
    reasons[#reasons + 1] = 'subsidy_cap'
  end
  -- risk windows count every order, whatever its outcome; members are order keys
  if ip ~= '' then
    local z = P .. 'ip:' .. ip
    redis.call('ZADD', z, 'NX', ta, key)
    if redis.call('ZCOUNT', z, ta - ip_window + 1, ta) > ip_limit then
      extra = extra + ip_weight
      reasons[#reasons + 1] = 'risk_ip_burst'
    end
    ips[z] = ta
  end
  if fp ~= '' and dup_window > 0 then
    -- the latest order with this fingerprint, as "key|accept time"
    local last = redis.call('SET', P .. 'dup:' .. fp, key .. '|' .. ta, 'GET', 'PX', 2 * dup_window)
    if last then
      local other, at = string.match(last, '^(.*)|(%d+)$')
      if other and other ~= key and math.abs(tonumber(at) - ta) <= dup_window then
        review = true
        reasons[#reasons + 1] = 'duplicate_suspect:' .. other
      end
    end
  end
  if base + extra >= review_score then review = true end
  local outcome = reject and 'r' or (review and 'w' or 'v')
  -- the record (msgpack): {outcome, extra, reasons, held {sku, qty, ...}, single-use
  -- coupons, subsidy key, goods, coupons (cents), released}; release.lua reads it
  local rec = {outcome, extra, reasons}
  if not reject then rec = {outcome, extra, reasons, hold, use, skey, goods, coupon_total, 0} end
  local ttl = outcome == 'w' and review_ttl or replay_ttl
  local old = redis.call('SET', P .. 'o:' .. key, cmsgpack.pack(rec), 'NX', 'GET', 'EX', ttl)
  if old then
    -- a redelivered order: its first decision stands, nothing is held again
    local d = cmsgpack.unpack(old)
    outcome, extra, reasons = d[1], d[2], d[3]
  elseif not reject then
    for i = 1, #hold, 2 do
      local s = stock[hold[i]]
      s.r = s.r + hold[i + 1]
      s.d = s.d + hold[i + 1]
      s.h[#s.h + 1] = key
      s.h[#s.h + 1] = hold[i + 1]
    end
    for _, code in ipairs(use) do redis.call('HSET', P .. 'cpn:' .. code, 'u', key) end
    if not sub then
      sub = {0, 0, 0, 0}
      subs[skey] = sub
    end
    sub[3] = sub[3] + goods
    sub[4] = sub[4] + coupon_total
  end
  local row = {outcome, extra, first}
  for _, r in ipairs(reasons) do row[#row + 1] = r end
  out[n] = row
end

for sku, s in pairs(stock) do
  if s.d > 0 then
    redis.call('HINCRBY', P .. 'sku:' .. sku, 'r', s.d)
    for i = 1, #s.h, 512 do  -- unpack() has a stack limit: chunks of 256 holders
      redis.call('HSET', P .. 'sku:' .. sku .. ':h', unpack(s.h, i, math.min(i + 511, #s.h)))
    end
  end
end
for skey, sub in pairs(subs) do
  if sub[3] > 0 then
    -- a customer's day key expires two days after it was made
    if redis.call('HINCRBY', skey, 'g', sub[3]) == sub[3] then redis.call('EXPIRE', skey, sub_ttl) end
  end
  if sub[4] > 0 then redis.call('HINCRBY', skey, 'c', sub[4]) end
end
for z, ta in pairs(ips) do
  redis.call('PEXPIRE', z, 2 * ip_window)
  if ta % 8 == 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. (ta - ip_window)) end
end
return cmsgpack.pack(out)
