-- The validation ledger for a batch: the customer's first order (priority 'new'), stock,
-- coupons, the subsidy cap, the IP and duplicate windows, decided and held per order
-- atomically (all lines or none; no coupon is burnt by an order short of stock, and no
-- stock is held by one whose coupon is gone).
-- Every key lies under ARGV[1]'s hash tag (one slot; KEYS[1] names it for routing);
-- names follow orderq/keys.py.
-- Cheap per order: the batch comes as one msgpack argument and the answer goes back as
-- one msgpack string; everything is read in a few calls per batch and written once per
-- batch (each write call inside a script costs several microseconds of server time,
-- a field inside one call a fraction of one). The windows, the subsidy totals and the
-- decisions live in time-bucketed hashes that expire as a whole.
-- Idempotent per order: a decided order is found first (its decision in od:<hour>) and
-- gets its first decision back, counted and held nothing twice; a holder already listed
-- for a SKU is never held again. An order in review also gets o:<order key>: what it
-- holds, for release.lua.
-- An order may wait much longer than its hour's bucket lives between this script and its
-- hand-off (a crash, a dead letter replayed next week): each decision is also kept in od:open,
-- without a TTL, where an order older than half the buckets' TTL is looked up, until the
-- worker reports it handed off (ARGV[15], closed here; orderq/openrecords.py sweeps the rest).
-- ARGV[1] prefix, [2] stock buffer (ppm), [3] unknown-SKU policy (review|reject|allow),
--   [4] IP orders per hour, [5] IP window (ms), [6] IP burst weight, [7] review score,
--   [8] duplicate window (ms, 0 off), [9] subsidy cap (basis points), [10] status TTL (s;
--   not used: an order in review keeps its record as long as it waits), [11] replay
--   record TTL (s), [12] subsidy TTL (s), [13] customer TTL (s),
--   [14] msgpack array of orders, each: {key, channel, "channel:customer id", accept
--   time (ms), base score, pre-rejected (0|1), ip, fingerprint, day, goods (cents),
--   coupons (cents), {sku, qty, ...}, {code, ...}, accept time (ms) as a string, approval
--   required (0|1: review unless something rejects)}
--   [15] msgpack array of order keys handed off since the last call, whose open decision goes
--   ('' none)
-- Returns msgpack: per order {outcome v|w|r, extra score, first order (0|1), reason...}
local P = ARGV[1]
local ppm, policy = tonumber(ARGV[2]), ARGV[3]
local ip_limit, ip_window, ip_weight = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ip_weight_s = ARGV[6]
local review_score, dup_window, cap_bp = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local replay_ttl, sub_ttl, cust_ttl = ARGV[11], ARGV[12], ARGV[13]
local orders = cmsgpack.unpack(ARGV[14])
local closing = (ARGV[15] and ARGV[15] ~= '') and cmsgpack.unpack(ARGV[15]) or {}
local OPEN = P .. 'od:open'
local CHUNK = 1000  -- unpack() has a stack limit: variadic calls go in chunks

local function mget(cmd, key, names)  -- HMGET key names / MGET names (key nil), chunked
  local out = {}
  for i = 1, #names, CHUNK do
    local j = math.min(i + CHUNK - 1, #names)
    local part = key and redis.call(cmd, key, unpack(names, i, j)) or redis.call(cmd, unpack(names, i, j))
    for k = 1, j - i + 1 do out[i + k - 1] = part[k] end
  end
  return out
end
local function hset_all(key, map, ttl, ms)  -- HSET key map..., then (P)EXPIRE key ttl
  local flat = {}
  for f, v in pairs(map) do
    flat[#flat + 1] = f
    flat[#flat + 1] = v
  end
  if #flat == 0 then return end
  for i = 1, #flat, 2 * CHUNK do
    redis.call('HSET', key, unpack(flat, i, math.min(i + 2 * CHUNK - 1, #flat)))
  end
  redis.call(ms and 'PEXPIRE' or 'EXPIRE', key, ttl)
end
local function hcall(cmd, key, flat, step)  -- HSET key flat... / HDEL key flat..., chunked
  for i = 1, #flat, step * CHUNK do
    redis.call(cmd, key, unpack(flat, i, math.min(i + step * CHUNK - 1, #flat)))
  end
end
local function group(bucket, field, into)  -- into[bucket] = {field, ...} (unique)
  local g = into[bucket]
  if not g then
    g = {list = {}, seen = {}}
    into[bucket] = g
  end
  if not g.seen[field] then
    g.seen[field] = true
    g.list[#g.list + 1] = field
  end
end
local function read_groups(into)  -- bucket -> {field -> value or nil}
  local out = {}
  for bucket, g in pairs(into) do
    local vals = mget('HMGET', bucket, g.list)
    local m = {}
    for i, f in ipairs(g.list) do
      if vals[i] then m[f] = vals[i] end
    end
    out[bucket] = m
  end
  return out
end
local function merge(into, more)  -- bucket -> fields, from a second read
  for b, m in pairs(more) do
    local have = into[b]
    if have then
      for f, v in pairs(m) do have[f] = v end
    else
      into[b] = m
    end
  end
end
local function hour(ms) return math.floor(ms / 3600000) end
-- Lua turns a number into a string slowly (microseconds): bucket names are made once each
local names = {}
local function bucket(kind, n)
  local m = names[kind]
  if not m then
    m = {}
    names[kind] = m
  end
  local k = m[n]
  if not k then
    k = P .. kind .. ':' .. n
    m[n] = k
  end
  return k
end

-- 1. what was decided already, and what the batch needs to read
local rec_groups, cust_keys = {}, {}
for n, o in ipairs(orders) do
  group(bucket('od', hour(o[4])), o[1], rec_groups)
  cust_keys[n] = P .. 'cust:' .. o[3]
end
local recs = read_groups(rec_groups)
-- an order older than half the buckets' TTL may have been decided before its bucket expired
-- (a younger one's decision is in its bucket still): its decision may be open
local clock = redis.call('TIME')
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
local old = {}
for _, o in ipairs(orders) do
  if not recs[bucket('od', hour(o[4]))][o[1]] and now_ms - o[4] > tonumber(replay_ttl) * 500 then
    old[#old + 1] = o[1]
  end
end
local open = {}
if #old > 0 then
  local v = mget('HMGET', OPEN, old)
  for i, key in ipairs(old) do open[key] = v[i] or nil end
end
local custs = mget('MGET', nil, cust_keys)
local decided = {}
local ip_groups, dup_groups, sub_groups = {}, {}, {}
local stock_orders = {}  -- sku -> {order key, ...}
for n, o in ipairs(orders) do
  local d = recs[bucket('od', hour(o[4]))][o[1]] or open[o[1]]
  if d then
    -- "<outcome><extra score>|reason|reason..."
    local rs = {}
    for r in string.gmatch(string.sub(d, 2), '|([^|]+)') do rs[#rs + 1] = r end
    decided[n] = {string.sub(d, 1, 1), tonumber(string.match(d, '^.(%d+)')), rs}
  else
    local ta, ip, fp = o[4], o[7], o[8]
    if ip ~= '' then
      group(bucket('ip', hour(ta)), ip, ip_groups)
    end
    if fp ~= '' and dup_window > 0 then
      local b = math.floor(ta / dup_window)
      group(bucket('dup', b), fp, dup_groups)
    end
    group(bucket('sub', o[9]), o[3] .. '|g', sub_groups)
    if o[11] > 0 then group(bucket('sub', o[9]), o[3] .. '|c', sub_groups) end
    for i = 1, #o[12], 2 do group(o[12][i], o[1], stock_orders) end
  end
end
local ipv, dupv, subv = read_groups(ip_groups), read_groups(dup_groups), read_groups(sub_groups)
-- an IP not seen this hour: its list may be in the previous hour's bucket
local ip_prev = {}
for b, m in pairs(ipv) do
  local h = tonumber(string.sub(b, #P + 4))
  for _, ip in ipairs(ip_groups[b].list) do
    if not m[ip] then group(bucket('ip', h - 1), ip, ip_prev) end
  end
end
merge(ipv, read_groups(ip_prev))
-- a fingerprint not seen in this window's bucket: the previous bucket may hold it
local dup_prev = {}
for b, m in pairs(dupv) do
  local k = tonumber(string.sub(b, #P + 5))
  for _, fp in ipairs(dup_groups[b].list) do
    if not m[fp] then group(bucket('dup', k - 1), fp, dup_prev) end
  end
end
merge(dupv, read_groups(dup_prev))
local stock = {}  -- sku -> {p = physical or false, r = reserved, d = delta, held = {key -> true}, h = {...}}
for sku, g in pairs(stock_orders) do
  local v = redis.call('HMGET', P .. 'sku:' .. sku, 'p', 'r')
  local s = {p = v[1] and tonumber(v[1]), r = tonumber(v[2] or 0), d = 0, held = {}, h = {}}
  if s.p then
    local held = mget('HMGET', P .. 'sku:' .. sku .. ':h', g.list)
    for i, k in ipairs(g.list) do
      if held[i] then s.held[k] = true end
    end
  end
  stock[sku] = s
end

-- the windows as the batch sees them (updated order by order, written back at the end)
local ip_seen = {}  -- ip -> accept times (ms, as strings) of its latest orders, oldest first,
                   -- at most ip_limit: whether the next one is one too many depends on those only
local function ip_times(ip, ta)
  local t = ip_seen[ip]
  if not t then
    t = {}
    -- the newest bucket's list is whole (each write carries the older entries forward)
    local prev = ipv[bucket('ip', hour(ta) - 1)]
    local v = ipv[bucket('ip', hour(ta))][ip] or (prev and prev[ip])
    if v then for x in string.gmatch(v, '%d+') do t[#t + 1] = x end end
    ip_seen[ip] = t
  end
  return t
end
local dup_seen = {}  -- fingerprint -> {order key, accept time} of the latest order
local function dup_last(fp, ta)
  local last = dup_seen[fp]
  if last == nil then
    last = false
    local b = math.floor(ta / dup_window)
    for k = b - 1, b do
      local v = dupv[bucket('dup', k)] and dupv[bucket('dup', k)][fp]
      if v then
        local other, at = string.match(v, '^(.*)|(%d+)$')
        if other and (not last or tonumber(at) > last[2]) then last = {other, tonumber(at), at} end
      end
    end
    dup_seen[fp] = last
  end
  return last
end

-- 2. decide, order by order
local out = {}
local new_custs = {}
local cust_now = {}
local rec_new = {}   -- bucket -> {order key -> record}
local open_new = {}  -- order key, record, ...: kept open until handed off
local ip_dirty, dup_dirty, sub_new = {}, {}, {}
for n, o in ipairs(orders) do
  local key, channel, who, ta = o[1], o[2], o[3], o[4]
  local base, pre, ip, fp, day = o[5], o[6], o[7], o[8], o[9]
  local goods, coupon_total, lines, codes, ta_s = o[10], o[11], o[12], o[13], o[14]
  -- first order of the customer: the key recorded first (or none yet)
  local ck = cust_keys[n]
  local known = cust_now[ck] or custs[n]
  local first = (not known or known == key) and 1 or 0
  if not known then
    cust_now[ck] = key
    new_custs[ck] = key
  end
  local d = decided[n]
  if d then
    -- a redelivered order: its first decision stands, nothing is counted or held again
    local row = {d[1], d[2], first}
    for _, r in ipairs(d[3]) do row[#row + 1] = r end
    out[n] = row
  else
    local reasons, reject, review, extra = {}, pre == 1, false, 0
    -- stock: every line checked; held below only if nothing rejects the order
    local hold = {}
    for i = 1, #lines, 2 do
      local sku, qty = lines[i], lines[i + 1]
      local s = stock[sku]
      if not s.p then
        if policy ~= 'allow' then
          if policy == 'reject' then reject = true else review = true end
          reasons[#reasons + 1] = 'unknown_sku:' .. sku
        end
      elseif s.held[key] then
        -- this order holds the SKU already (a replay older than its record)
      elseif qty > math.floor(s.p * ppm / 1000000) - s.r then
        reject = true
        reasons[#reasons + 1] = 'out_of_stock:' .. sku
      else
        hold[#hold + 1] = sku
        hold[#hold + 1] = qty
      end
    end
    -- coupons orderq knows: platform, expiry at the accept time, single use
    local use, seen = codes, nil  -- (no coupons: the empty list serves)
    local cross, expired, used = false, false, false
    if #codes > 0 then use, seen = {}, {} end
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
    local skey, gf, cf = bucket('sub', day), who .. '|g', who .. '|c'
    local sv = subv[skey]
    local g, c = tonumber(sv[gf] or 0), tonumber(sv[cf] or 0)
    if coupon_total > 0 and (c + coupon_total) * 10000 > cap_bp * (g + goods) then
      reject = true
      reasons[#reasons + 1] = 'subsidy_cap'
    end
    -- risk windows count every order, whatever its outcome
    if ip ~= '' then
      local t = ip_times(ip, ta)
      local count = 1
      for _, x in ipairs(t) do
        local xn = tonumber(x)
        if xn > ta - ip_window and xn <= ta then count = count + 1 end
      end
      if count > ip_limit then
        extra = extra + ip_weight
        reasons[#reasons + 1] = 'risk_ip_burst'
      end
      t[#t + 1] = ta_s  -- the batch comes in acceptance order: appending keeps t sorted
      while #t > ip_limit do table.remove(t, 1) end
      ip_dirty[ip] = ta
    end
    if fp ~= '' and dup_window > 0 then
      local last = dup_last(fp, ta)
      if last and last[1] ~= key and math.abs(last[2] - ta) <= dup_window then
        review = true
        reasons[#reasons + 1] = 'duplicate_suspect:' .. last[1]
      end
      if not last or ta >= last[2] then dup_seen[fp] = {key, ta, ta_s} end
      dup_dirty[fp] = true
    end
    if base + extra >= review_score or o[15] == 1 then review = true end
    local outcome = reject and 'r' or (review and 'w' or 'v')
    if not reject then
      for i = 1, #hold, 2 do
        local s = stock[hold[i]]
        s.r = s.r + hold[i + 1]
        s.d = s.d + hold[i + 1]
        s.held[key] = true
        s.h[#s.h + 1] = key
        s.h[#s.h + 1] = hold[i + 1]
      end
      for _, code in ipairs(use) do redis.call('HSET', P .. 'cpn:' .. code, 'u', key) end
      sv[gf] = g + goods
      local w = sub_new[skey] or {}
      sub_new[skey] = w
      w[gf] = sv[gf]
      if coupon_total > 0 then
        sv[cf] = c + coupon_total
        w[cf] = sv[cf]
      end
    end
    if outcome == 'w' then
      -- kept as long as the order waits, without a TTL like its status record: a reviewer's
      -- reject releases by it (release.lua); the decision gives it the status TTL (review.py)
      local rec = {outcome, extra, reasons, hold, use, skey, who, goods, coupon_total, 0}
      redis.call('SET', P .. 'o:' .. key, cmsgpack.pack(rec))
    end
    local b = bucket('od', hour(ta))
    rec_new[b] = rec_new[b] or {}
    local text = outcome .. (extra == 0 and '0' or ip_weight_s)
    if #reasons > 0 then text = text .. '|' .. table.concat(reasons, '|') end
    rec_new[b][key] = text
    open_new[#open_new + 1] = key
    open_new[#open_new + 1] = text
    local row = {outcome, extra, first}
    for _, r in ipairs(reasons) do row[#row + 1] = r end
    out[n] = row
  end
end

-- 3. write back, once per key
for sku, s in pairs(stock) do
  if s.d > 0 then
    redis.call('HINCRBY', P .. 'sku:' .. sku, 'r', s.d)
    for i = 1, #s.h, 2 * CHUNK do
      redis.call('HSET', P .. 'sku:' .. sku .. ':h', unpack(s.h, i, math.min(i + 2 * CHUNK - 1, #s.h)))
    end
  end
end
for ck, key in pairs(new_custs) do redis.call('SET', ck, key, 'EX', cust_ttl) end
for b, m in pairs(rec_new) do hset_all(b, m, replay_ttl) end
hcall('HSET', OPEN, open_new, 2)
if #closing > 0 then  -- (an order of this very batch is not closed: it is being decided again)
  local here, gone = {}, {}
  for _, o in ipairs(orders) do here[o[1]] = true end
  for _, key in ipairs(closing) do
    if not here[key] then gone[#gone + 1] = key end
  end
  hcall('HDEL', OPEN, gone, 1)
end
local by_bucket = {}
for ip, ta in pairs(ip_dirty) do
  local b = bucket('ip', hour(ta))
  by_bucket[b] = by_bucket[b] or {}
  by_bucket[b][ip] = table.concat(ip_seen[ip], ',')
end
for b, m in pairs(by_bucket) do hset_all(b, m, 2 * ip_window + 60000, true) end
by_bucket = {}
for fp in pairs(dup_dirty) do
  local last = dup_seen[fp]
  local b = bucket('dup', math.floor(last[2] / dup_window))
  by_bucket[b] = by_bucket[b] or {}
  by_bucket[b][fp] = last[1] .. '|' .. last[3]
end
for b, m in pairs(by_bucket) do hset_all(b, m, 3 * dup_window + 60000, true) end
for skey, m in pairs(sub_new) do hset_all(skey, m, sub_ttl) end
return cmsgpack.pack(out)
