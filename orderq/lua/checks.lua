-- The validation ledger for a batch: the customer's first order (priority 'new'), stock,
-- coupons, the subsidy cap, the IP and duplicate windows, decided and held per order
-- atomically (all lines or none; no coupon is burnt by an order short of stock, and no
-- stock is held by one whose coupon is gone).
-- Every key it touches comes in KEYS (all in the ledger's slot), built by orderq/keys.py: KEYS[1]
-- the open decisions (od:open), then each distinct key of the batch once (its time buckets,
-- customers, ledger records, SKUs with their holders, coupons); a row names its keys by index.
-- Cheap per order: the batch comes as one msgpack argument and the answer goes back as
-- one msgpack string; everything (a coupon too) is read in a few calls per batch and written
-- once per batch (each write call inside a script costs several microseconds of server time,
-- a field inside one call a fraction of one). The windows, the subsidy totals and the
-- decisions live in time-bucketed hashes that expire as a whole.
-- Idempotent per order: a decided order is found first (its decision in od:<hour>) and
-- gets its first decision back, counted and held nothing twice; a holder already listed
-- for a SKU is never held again. An order in review also gets o:<order key>: what it
-- holds, for release.lua.
-- An order may wait much longer than its hour's bucket lives between this script and its
-- hand-off (a crash, a dead letter replayed next week): each decision is also kept in od:open,
-- without a TTL, where an order older than half the buckets' TTL is looked up, until the
-- worker reports it handed off (ARGV[14], closed here; orderq/openrecords.py sweeps the rest).
-- ARGV[1] stock buffer (ppm), [2] unknown-SKU policy (review|reject|allow),
--   [3] IP orders per hour, [4] IP window (ms), [5] IP burst weight, [6] review score,
--   [7] duplicate window (ms, 0 off), [8] subsidy cap (basis points), [9] status TTL (s;
--   not used: an order in review keeps its record as long as it waits), [10] replay
--   record TTL (s), [11] subsidy TTL (s), [12] customer TTL (s),
--   [13] msgpack array of orders, each a DecisionRow (orderq/wire.py; read through R below)
--   [14] msgpack array of order keys handed off since the last call, whose open decision goes
--   ('' none)
-- Returns msgpack: per order a DecisionReply {outcome v|w|r, extra score, first order (0|1),
--   {reason, ...}}
-- Records of orderq/wire.py, read by field name (their tables come with the script: wire.with_tables)
local R, H, A = DecisionRow, ReviewHold, DecisionReply
local function reply(outcome, extra, first, reasons)
  local t = {}
  t[A.outcome], t[A.extra_score], t[A.first_order], t[A.reasons] = outcome, extra, first, reasons
  return t
end
local ppm, policy = tonumber(ARGV[1]), ARGV[2]
local ip_limit, ip_window, ip_weight = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ip_weight_s = ARGV[5]
local review_score, dup_window, cap_bp = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local replay_ttl, sub_ttl, cust_ttl = ARGV[10], ARGV[11], ARGV[12]
local orders = cmsgpack.unpack(ARGV[13])
local closing = (ARGV[14] and ARGV[14] ~= '') and cmsgpack.unpack(ARGV[14]) or {}
local OPEN = KEYS[1]
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
local function hset_all(k, map, ttl, ms)  -- HSET KEYS[k] map..., then (P)EXPIRE it ttl
  local flat = {}
  for f, v in pairs(map) do
    flat[#flat + 1] = f
    flat[#flat + 1] = v
  end
  if #flat == 0 then return end
  for i = 1, #flat, 2 * CHUNK do
    redis.call('HSET', KEYS[k], unpack(flat, i, math.min(i + 2 * CHUNK - 1, #flat)))
  end
  redis.call(ms and 'PEXPIRE' or 'EXPIRE', KEYS[k], ttl)
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

-- 1. what was decided already, and what the batch needs to read (buckets by their key name)
local rec_groups, cust_keys = {}, {}
for n, o in ipairs(orders) do
  group(KEYS[o[R.decided_key]], o[R.key], rec_groups)
  cust_keys[n] = KEYS[o[R.customer_key]]
end
local recs = read_groups(rec_groups)
-- an order older than half the buckets' TTL may have been decided before its bucket expired
-- (a younger one's decision is in its bucket still): its decision may be open
local clock = redis.call('TIME')
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
local old = {}
for _, o in ipairs(orders) do
  if not recs[KEYS[o[R.decided_key]]][o[R.key]] and now_ms - o[R.accepted_ms] > tonumber(replay_ttl) * 500 then
    old[#old + 1] = o[R.key]
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
local sku_key = {}  -- sku -> index of its stock key (its holders key: the next)
local ip_prev_of, dup_prev_of = {}, {}  -- bucket -> the bucket before it
for n, o in ipairs(orders) do
  local d = recs[KEYS[o[R.decided_key]]][o[R.key]] or open[o[R.key]]
  if d then
    -- "<outcome><extra score>|reason|reason..."
    local rs = {}
    for r in string.gmatch(string.sub(d, 2), '|([^|]+)') do rs[#rs + 1] = r end
    decided[n] = {string.sub(d, 1, 1), tonumber(string.match(d, '^.(%d+)')), rs}
  else
    local ip, fp = o[R.ip], o[R.fingerprint]
    if ip ~= '' then
      local b = KEYS[o[R.ip_key]]
      group(b, ip, ip_groups)
      ip_prev_of[b] = KEYS[o[R.ip_prev_key]]
    end
    if fp ~= '' and dup_window > 0 then
      local b = KEYS[o[R.dup_key]]
      group(b, fp, dup_groups)
      dup_prev_of[b] = KEYS[o[R.dup_prev_key]]
    end
    local sb = KEYS[o[R.subsidy_key]]
    group(sb, o[R.customer] .. '|g', sub_groups)
    if o[R.coupons] > 0 then group(sb, o[R.customer] .. '|c', sub_groups) end
    local lines = o[R.lines]
    for i = 1, #lines, 3 do
      group(lines[i], o[R.key], stock_orders)
      sku_key[lines[i]] = lines[i + 2]
    end
  end
end
local ipv, dupv, subv = read_groups(ip_groups), read_groups(dup_groups), read_groups(sub_groups)
-- an IP not seen this hour: its list may be in the previous hour's bucket
local ip_prev = {}
for b, m in pairs(ipv) do
  for _, ip in ipairs(ip_groups[b].list) do
    if not m[ip] then group(ip_prev_of[b], ip, ip_prev) end
  end
end
merge(ipv, read_groups(ip_prev))
-- a fingerprint not seen in this window's bucket: the previous bucket may hold it
local dup_prev = {}
for b, m in pairs(dupv) do
  for _, fp in ipairs(dup_groups[b].list) do
    if not m[fp] then group(dup_prev_of[b], fp, dup_prev) end
  end
end
merge(dupv, read_groups(dup_prev))
local stock = {}  -- sku -> {k = its stock key's index, p = physical or false, r = reserved,
                 --        d = delta, held = {key -> true}, h = {...}}
for sku, g in pairs(stock_orders) do
  local k = sku_key[sku]
  local v = redis.call('HMGET', KEYS[k], 'p', 'r')
  local s = {k = k, p = v[1] and tonumber(v[1]), r = tonumber(v[2] or 0), d = 0, held = {}, h = {}}
  if s.p then
    local held = mget('HMGET', KEYS[k + 1], g.list)
    for i, k in ipairs(g.list) do
      if held[i] then s.held[k] = true end
    end
  end
  stock[sku] = s
end

-- the windows as the batch sees them (updated order by order, written back at the end)
local ip_seen = {}  -- ip -> accept times (ms, as strings) of its latest orders, oldest first,
                   -- at most ip_limit: whether the next one is one too many depends on those only
local function ip_times(ip, o)  -- (o: the order, whose hour's bucket and the one before are read)
  local t = ip_seen[ip]
  if not t then
    t = {}
    -- the newest bucket's list is whole (each write carries the older entries forward)
    local prev = ipv[KEYS[o[R.ip_prev_key]]]
    local v = ipv[KEYS[o[R.ip_key]]][ip] or (prev and prev[ip])
    if v then for x in string.gmatch(v, '%d+') do t[#t + 1] = x end end
    ip_seen[ip] = t
  end
  return t
end
local dup_seen = {}  -- fingerprint -> {order key, accept time, its text, its bucket's index} of the latest order
local function dup_last(fp, o)  -- (o: the order, whose window's bucket and the one before are read)
  local last = dup_seen[fp]
  if last == nil then
    last = false
    for _, k in ipairs({o[R.dup_prev_key], o[R.dup_key]}) do
      local v = dupv[KEYS[k]] and dupv[KEYS[k]][fp]
      if v then
        local other, at = string.match(v, '^(.*)|(%d+)$')
        if other and (not last or tonumber(at) > last[2]) then last = {other, tonumber(at), at, k} end
      end
    end
    dup_seen[fp] = last
  end
  return last
end

-- 2. decide, order by order
local out = {}
local new_custs = {}  -- customer key's index -> the order key recorded first
local cust_now = {}
local rec_new = {}   -- bucket's index -> {order key -> record}
local open_new = {}  -- order key, record, ...: kept open until handed off
local ip_dirty, dup_dirty, sub_new = {}, {}, {}
-- coupons: each read once per batch ({pf, x, one, u} by its key's index; 'u' as the batch set
-- it), their single uses written back once at the end
local coupon, coupon_used = {}, {}
for n, o in ipairs(orders) do
  local key, channel, who, ta = o[R.key], o[R.channel], o[R.customer], o[R.accepted_ms]
  local base, pre, ip, fp, day = o[R.base_score], o[R.pre_rejected], o[R.ip], o[R.fingerprint], o[R.day]
  local goods, coupon_total, lines, codes, ta_s = o[R.goods], o[R.coupons], o[R.lines], o[R.codes], o[R.accepted_ms_text]
  -- first order of the customer: the key recorded first (or none yet)
  local ci = o[R.customer_key]
  local known = cust_now[ci] or custs[n]
  local first = (not known or known == key) and 1 or 0
  if not known then
    cust_now[ci] = key
    new_custs[ci] = key
  end
  local d = decided[n]
  if d then
    -- a redelivered order: its first decision stands, nothing is counted or held again
    out[n] = reply(d[1], d[2], first, d[3])
  else
    local reasons, reject, review, extra = {}, pre == 1, false, 0
    -- stock: every line checked; held below only if nothing rejects the order
    local hold = {}
    for i = 1, #lines, 3 do
      local sku, qty = lines[i], lines[i + 1]
      local s = stock[sku]
      if not s.p then
        if policy ~= 'allow' then
          if policy == 'reject' then reject = true else review = true end
          reasons[#reasons + 1] = 'unknown_sku:' .. sku
        end
      elseif s.held[key] then
        -- this order holds the SKU already (a replay older than its record)
      elseif qty > Ledger.sellable(s.p, s.r, ppm) then
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
    local use_keys = {}  -- the coupon key of each code of use
    for ci = 1, #codes, 2 do
      local code, ck = codes[ci], codes[ci + 1]
      local c = coupon[ck]
      if not c then
        c = redis.call('HMGET', KEYS[ck], 'pf', 'x', 'one', 'u')
        coupon[ck] = c
      end
      if c[1] then
        if c[1] ~= channel then cross = true end
        local x = tonumber(c[2] or 0)
        if x > 0 and x < ta then expired = true end
        if c[3] == '1' then
          if seen[code] or (c[4] and c[4] ~= key) then
            used = true
          else
            use[#use + 1] = code
            use_keys[#use_keys + 1] = ck
          end
        end
      end
      seen[code] = true
    end
    if cross then reasons[#reasons + 1] = 'coupon_cross_platform' end
    if expired then reasons[#reasons + 1] = 'coupon_expired' end
    if used then reasons[#reasons + 1] = 'coupon_used' end
    reject = reject or cross or expired or used
    -- subsidy: a customer's coupons in one day stay within the cap of their day's goods
    local skey, gf, cf = KEYS[o[R.subsidy_key]], who .. '|g', who .. '|c'
    local sv = subv[skey]
    local g, c = tonumber(sv[gf] or 0), tonumber(sv[cf] or 0)
    if coupon_total > 0 and (c + coupon_total) * 10000 > cap_bp * (g + goods) then
      reject = true
      reasons[#reasons + 1] = 'subsidy_cap'
    end
    -- risk windows count every order, whatever its outcome
    if ip ~= '' then
      local t = ip_times(ip, o)
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
      ip_dirty[ip] = o[R.ip_key]  -- (the batch's latest order of the IP: its bucket)
    end
    if fp ~= '' and dup_window > 0 then
      local last = dup_last(fp, o)
      if last and last[1] ~= key and math.abs(last[2] - ta) <= dup_window then
        review = true
        reasons[#reasons + 1] = 'duplicate_suspect:' .. last[1]
      end
      if not last or ta >= last[2] then dup_seen[fp] = {key, ta, ta_s, o[R.dup_key]} end
      dup_dirty[fp] = true
    end
    if base + extra >= review_score or o[R.approval] == 1 then review = true end
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
      for _, ck in ipairs(use_keys) do
        coupon[ck][4] = key  -- (what the batch's next orders read)
        coupon_used[ck] = key
      end
      sv[gf] = g + goods
      local w = sub_new[o[R.subsidy_key]] or {}
      sub_new[o[R.subsidy_key]] = w
      w[gf] = sv[gf]
      if coupon_total > 0 then
        sv[cf] = c + coupon_total
        w[cf] = sv[cf]
      end
    end
    if outcome == 'w' then
      -- kept as long as the order waits, without a TTL like its status record: a reviewer's
      -- reject releases by it (release.lua); the decision gives it the status TTL (review.py)
      local rec = {}
      rec[H.outcome], rec[H.extra_score], rec[H.reasons], rec[H.held] = outcome, extra, reasons, hold
      rec[H.coupons], rec[H.day], rec[H.customer], rec[H.goods] = use, day, who, goods
      rec[H.coupon_cents], rec[H.released] = coupon_total, 0
      redis.call('SET', KEYS[o[R.hold_key]], cmsgpack.pack(rec))
    end
    local b = o[R.decided_key]
    rec_new[b] = rec_new[b] or {}
    local text = outcome .. (extra == 0 and '0' or ip_weight_s)
    if #reasons > 0 then text = text .. '|' .. table.concat(reasons, '|') end
    rec_new[b][key] = text
    open_new[#open_new + 1] = key
    open_new[#open_new + 1] = text
    out[n] = reply(outcome, extra, first, reasons)
  end
end

-- 3. write back, once per key
for _, s in pairs(stock) do
  if s.d > 0 then
    redis.call('HINCRBY', KEYS[s.k], 'r', s.d)
    for i = 1, #s.h, 2 * CHUNK do
      redis.call('HSET', KEYS[s.k + 1], unpack(s.h, i, math.min(i + 2 * CHUNK - 1, #s.h)))
    end
  end
end
for ck, key in pairs(coupon_used) do redis.call('HSET', KEYS[ck], 'u', key) end
for ci, key in pairs(new_custs) do redis.call('SET', KEYS[ci], key, 'EX', cust_ttl) end
for b, m in pairs(rec_new) do hset_all(b, m, replay_ttl) end
hcall('HSET', OPEN, open_new, 2)
if #closing > 0 then  -- (an order of this very batch is not closed: it is being decided again)
  local here, gone = {}, {}
  for _, o in ipairs(orders) do here[o[R.key]] = true end
  for _, key in ipairs(closing) do
    if not here[key] then gone[#gone + 1] = key end
  end
  hcall('HDEL', OPEN, gone, 1)
end
local by_bucket = {}
for ip, b in pairs(ip_dirty) do
  by_bucket[b] = by_bucket[b] or {}
  by_bucket[b][ip] = table.concat(ip_seen[ip], ',')
end
for b, m in pairs(by_bucket) do hset_all(b, m, 2 * ip_window + 60000, true) end
by_bucket = {}
for fp in pairs(dup_dirty) do
  local last = dup_seen[fp]
  local b = last[4]  -- (where it was read, or the bucket of the order that set it)
  by_bucket[b] = by_bucket[b] or {}
  by_bucket[b][fp] = last[1] .. '|' .. last[3]
end
for b, m in pairs(by_bucket) do hset_all(b, m, 3 * dup_window + 60000, true) end
for k, m in pairs(sub_new) do hset_all(k, m, sub_ttl) end
return cmsgpack.pack(out)
