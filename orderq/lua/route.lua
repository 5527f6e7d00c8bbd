-- Fulfilment routing for a batch of ready orders: which warehouse ships each line,
-- each gift from its main line's warehouse, the freight estimate and its limit, and the
-- per-warehouse allocation, atomically per order. Python ranked each order's candidate
-- warehouses by the routing rules (execute/routing.py); here stock decides among them.
-- Every key it touches comes in KEYS (all in the ledger's slot), built by orderq/keys.py:
-- KEYS[1] rt:open, [2] wh:retired, [3] gift_oos, [3 + i] wh:<i-th warehouse>:skus, then each
-- distinct rt:<hour> of the batch (a row names its own by index), then per SKU of the batch
-- (ARGV[8] gives where): sku:<sku>, sku:<sku>:h, and sku:<sku>:h:<wh> for each warehouse of the
-- candidate lists of its orders (the only places it may be allocated).
-- Stock: sku:<sku> holds p (total physical), r (total reserved), w:<wh> physical in a
-- warehouse and a:<wh> units allocated there; a SKU with no w:<wh> field is not counted
-- per warehouse (any warehouse may ship it, nothing is allocated). Units an order holds in
-- total (sku:<sku>:h, from validation) move to the warehouse it ships from
-- (sku:<sku>:h:<wh>), where that warehouse's next count settles them (restock.lua).
-- Idempotent per order: the route is recorded (field <order key> of rt:<accept hour>, a
-- hash per hour expiring as a whole, like the validation decisions) with what it allocated,
-- and every order's record is looked up, whatever its delivery count: an order routed a
-- second time (its executor died before the execute script, and the entry came back as a
-- redelivery, or as a new entry: a region hold lifted, a dead letter replayed, a failover
-- that lost the delivery but not the route) gets its route back and allocates nothing
-- twice. An order sent to review for its freight allocates nothing and is not recorded
-- (routed afresh once approved).
-- An order may wait much longer than its hour's bucket lives between this script and its
-- execution (held, a dead letter replayed next week, the stage down after a crash): each route
-- is also kept in rt:open, without a TTL, where an order accepted longer ago than half the
-- buckets' TTL is looked up, until the worker reports it executed (ARGV[7], closed here;
-- orderq/openrecords.py sweeps the rest).
-- Removed warehouses (wh:retired, orderq/warehouses.py) are never picked, even by an executor
-- whose warehouse list is a moment old; a SKU allocated where it has no count of its own (a
-- backorder) is listed under wh:<wh>:skus, so the warehouse's removal sees it.
-- ARGV[1] stock buffer (ppm), [2] route record TTL (s), [3] msgpack:
--   {warehouse ids...} (every warehouse a candidate may name), [4] msgpack: candidate lists
--   (orders to one place share theirs), each {{warehouse index, distance (km), base (cents),
--   per km (cents/1000), per unit (cents), parcel text up to the freight, the same for a
--   split}, ...} best first, [5] msgpack array of orders, each {key, {sku, qty, ...}
--   lines (first: the main line), {sku, qty, ...} gifts, candidate list index, goods
--   (cents), freight limit (basis points of goods, 0: none), accept hour (ms // 3600000),
--   lines and gifts as route text, index of its rt:<accept hour> in KEYS}
--   [6] '1': warehouses are configured (render the route), else gifts only
--   [7] msgpack array of order keys executed since the last call, whose open route goes ('' none)
--   [8] msgpack: per SKU of the batch {sku, index of sku:<sku> in KEYS, {warehouse index, ...}}:
--   sku:<sku>:h is next, then sku:<sku>:h:<wh> of each warehouse listed, in that order
-- Returns msgpack: per order its record "<s|w>\t<freight cents>\t<picks: SH,GZ>\t<gifts out
--   of stock: SKU,...>\t<route>" (picks and route empty when not routed or in review)
local ppm, ttl = tonumber(ARGV[1]), ARGV[2]
local whs = cmsgpack.unpack(ARGV[3])
local cand_lists = cmsgpack.unpack(ARGV[4])
local orders = cmsgpack.unpack(ARGV[5])
local routing = ARGV[6] == '1'  -- warehouses configured: the route is rendered for the status record
local closing = (ARGV[7] and ARGV[7] ~= '') and cmsgpack.unpack(ARGV[7]) or {}
local OPEN = KEYS[1]
local wh_index = {}  -- warehouse id -> its index (its wh:<wh>:skus is KEYS[3 + index])
for i, wh in ipairs(whs) do wh_index[wh] = i end
local sku_keys = {}  -- sku -> {index of sku:<sku> (sku:<sku>:h next), {warehouse id -> index of sku:<sku>:h:<wh>}}
do
  local layout = cmsgpack.unpack(ARGV[8])
  for i = 1, #layout, 3 do
    local k, at = layout[i + 1], {}
    for j, w in ipairs(layout[i + 2]) do at[whs[w]] = k + 1 + j end
    sku_keys[layout[i]] = {k, at}
  end
end

local CHUNK = 1000  -- unpack() has a stack limit: variadic calls go in chunks
local function chunked(cmd, key, names)  -- HMGET key names / MGET names (key nil), chunked
  local out = {}
  for i = 1, #names, CHUNK do
    local j = math.min(i + CHUNK - 1, #names)
    local part = key and redis.call(cmd, key, unpack(names, i, j)) or redis.call(cmd, unpack(names, i, j))
    for k = 1, j - i + 1 do out[i + k - 1] = part[k] end
  end
  return out
end
local function write(cmd, key, flat, step)  -- HSET key flat... / HDEL key flat..., chunked
  for i = 1, #flat, step * CHUNK do
    redis.call(cmd, key, unpack(flat, i, math.min(i + step * CHUNK - 1, #flat)))
  end
end

-- 0. warehouses removed since the executor read its list: left out of every candidate list
if routing then
  local gone = redis.call('SMISMEMBER', KEYS[2], unpack(whs))
  local dead = {}
  for i, g in ipairs(gone) do
    if g == 1 then dead[i] = true end
  end
  if next(dead) then
    for li, list in ipairs(cand_lists) do
      local live = {}
      for _, c in ipairs(list) do
        if not dead[c[1]] then live[#live + 1] = c end
      end
      if #live == 0 then  -- (TRYAGAIN: the batch is retried, with the new list, not blamed)
        return redis.error_reply('TRYAGAIN every warehouse of a candidate list was removed')
      end
      cand_lists[li] = live
    end
  end
end

-- 1. orders routed already (any order may have been, see above), and the stock the others need
local buckets = {}  -- rt:<hour>'s index -> {order key, ...}
local bucket_of = {}
for n, o in ipairs(orders) do
  local b = o[10]
  bucket_of[n] = b
  buckets[b] = buckets[b] or {}
  local list = buckets[b]
  list[#list + 1] = o[1]
end
local recorded = {}  -- bucket -> {order key -> record}
for b, list in pairs(buckets) do
  local v = chunked('HMGET', KEYS[b], list)
  local m = {}
  for i, key in ipairs(list) do m[key] = v[i] end
  recorded[b] = m
end
local recs, new_recs = {}, {}
for n, o in ipairs(orders) do recs[n] = recorded[bucket_of[n]][o[1]] or false end
-- an order that may be older than half the buckets' TTL (its accept hour's start bounds its
-- age from above) may have been routed before its bucket expired: its route may be open
local now_s = tonumber(redis.call('TIME')[1])
local old, old_at = {}, {}
for n, o in ipairs(orders) do
  if not recs[n] and now_s - tonumber(o[7]) * 3600 >= tonumber(ttl) / 2 then
    old[#old + 1] = o[1]
    old_at[#old_at + 1] = n
  end
end
if #old > 0 then
  local v = chunked('HMGET', OPEN, old)
  for i, n in ipairs(old_at) do recs[n] = v[i] or false end
end
local stock = {}  -- sku -> {p, r, dr, tracked, avail = {wh -> units}, counted = {wh -> true}, da = {wh -> units}, h = {key -> units}, hw = {wh -> {key -> units}}}
local fields = {'p', 'r'}
for _, wh in ipairs(whs) do
  fields[#fields + 1] = 'w:' .. wh
  fields[#fields + 1] = 'a:' .. wh
end
local holders = {}  -- sku -> {key, ...}
local function need(sku, key)
  if not stock[sku] then
    local v = redis.call('HMGET', KEYS[sku_keys[sku][1]], unpack(fields))
    local s = {p = v[1] and tonumber(v[1]), r = tonumber(v[2] or 0), dr = 0, tracked = false,
               avail = {}, counted = {}, da = {}, h = {}, hw = {}}
    for i, wh in ipairs(whs) do
      local w = v[1 + 2 * i]
      if w then
        s.tracked = true
        s.counted[wh] = true
      end
      s.avail[wh] = tonumber(w or 0) - tonumber(v[2 + 2 * i] or 0)
    end
    stock[sku] = s
    holders[sku] = {}
  end
  local h = holders[sku]
  h[#h + 1] = key
end
for n, o in ipairs(orders) do
  if not recs[n] then
    for i = 1, #o[2], 2 do need(o[2][i], o[1]) end
    for i = 1, #o[3], 2 do need(o[3][i], o[1]) end
  end
end
for sku, keys in pairs(holders) do
  local v = chunked('HMGET', KEYS[sku_keys[sku][1] + 1], keys)
  local s = stock[sku]
  s.h0 = {}  -- as read: only what changed is written back
  for i, key in ipairs(keys) do
    s.h[key] = tonumber(v[i] or 0)
    s.h0[key] = s.h[key]
  end
end

local function can(sku, wh, qty)  -- whether warehouse wh can ship qty of sku
  local s = stock[sku]
  return not s.p or not s.tracked or s.avail[wh] >= qty
end
local function sellable(s)  -- units of a SKU nobody holds yet, in total
  return Ledger.sellable(s.p, s.r + s.dr, ppm)
end
local function allocate(sku, wh, key, qty, reserved)  -- qty of sku shipped by wh for key
  local s = stock[sku]
  if not s.p then return end  -- no stock record: not counted
  if not s.tracked then
    -- counted in total only: a line's units stay held as validation held them; a gift's
    -- are held now, in total, until the next count
    if not reserved then
      s.dr = s.dr + qty
      s.h[key] = s.h[key] + qty
    end
    return
  end
  -- the units validation held in total move to the warehouse; any it did not hold are
  -- held now (the total reservation always covers every allocation)
  local from_h = reserved and math.min(s.h[key], qty) or 0
  s.h[key] = s.h[key] - from_h
  s.dr = s.dr + qty - from_h
  s.avail[wh] = s.avail[wh] - qty
  s.da[wh] = (s.da[wh] or 0) + qty
  local hw = s.hw[wh] or {}
  s.hw[wh] = hw
  hw[key] = (hw[key] or 0) + qty
end

-- 2. route, order by order. A candidate is {warehouse index, distance (km), base (cents),
-- per km (cents/1000), per unit (cents), its parcel's text up to the freight, the same for a
-- split}. A route is text, its parcels joined by ';', each a wire.RouteParcel (orderq/wire.py
-- names its fields and parses it): "<head>|<freight cents>|<sku>:<qty>,...|<gift sku>:<qty>,...".
local function items(flat)
  local parts = {}
  for i = 1, #flat, 2 do parts[#parts + 1] = flat[i] .. ':' .. flat[i + 1] end
  return table.concat(parts, ',')
end
local out = {}
local routed = {}  -- order key -> its record, for a key twice in one batch
for n, o in ipairs(orders) do
  local key = o[1]
  if recs[n] then
    out[n] = recs[n]
  elseif routed[key] then
    out[n] = routed[key]
  else
    local lines, gifts, cands = o[2], o[3], cand_lists[o[4]]
    local goods, limit_bp = o[5], o[6]
    -- one warehouse that has every line, best first
    local parcels = {}  -- {candidate, {sku, qty, ...}, split}
    for _, c in ipairs(cands) do
      local wh, ok = whs[c[1]], true
      for i = 1, #lines, 2 do
        if not can(lines[i], wh, lines[i + 1]) then
          ok = false
          break
        end
      end
      if ok then
        parcels[1] = {c, lines, false}
        break
      end
    end
    if #parcels == 0 then
      -- split: each warehouse in turn takes the whole lines it has; a line no warehouse has
      -- whole is split by units; what no warehouse has ships from the best (backorder)
      local left, by_cand = {}, {}
      for i = 1, #lines, 2 do left[#left + 1] = {lines[i], lines[i + 1]} end
      local function take(ci, sku, qty)
        local p = by_cand[ci]
        if not p then
          p = {cands[ci], {}, true}
          by_cand[ci] = p
        end
        p[2][#p[2] + 1] = sku
        p[2][#p[2] + 1] = qty
      end
      for ci, c in ipairs(cands) do
        for _, l in ipairs(left) do
          if l[2] > 0 and can(l[1], whs[c[1]], l[2]) then
            take(ci, l[1], l[2])
            l[2] = 0
          end
        end
      end
      for ci, c in ipairs(cands) do
        for _, l in ipairs(left) do
          local have = stock[l[1]].avail[whs[c[1]]]
          if l[2] > 0 and have > 0 then
            local q = math.min(have, l[2])
            take(ci, l[1], q)
            l[2] = l[2] - q
          end
        end
      end
      for _, l in ipairs(left) do
        if l[2] > 0 then take(1, l[1], l[2]) end
      end
      for ci = 1, #cands do
        if by_cand[ci] then parcels[#parcels + 1] = by_cand[ci] end
      end
    end
    -- freight: per parcel, base + per km x distance + per unit x units
    local freight = 0
    for _, p in ipairs(parcels) do
      local c, units = p[1], 0
      for i = 2, #p[2], 2 do units = units + p[2][i] end
      p[4] = c[3] + math.floor(c[4] * c[2] / 1000 + 0.5) + c[5] * units
      freight = freight + p[4]
    end
    if limit_bp > 0 and freight * 10000 > limit_bp * goods then
      -- a person decides: nothing allocated, nothing recorded (the execute stage writes what
      -- the order holds from validation, o:<key>, for a reviewer's reject to release)
      out[n] = 'w\t' .. freight .. '\t\t\t'
      routed[key] = out[n]
    else
      -- the lines' units leave their warehouses' free stock (sub-units of a split line too)
      local main  -- the parcel with the order's first line
      for _, p in ipairs(parcels) do
        local wh = whs[p[1][1]]
        for i = 1, #p[2], 2 do
          allocate(p[2][i], wh, key, p[2][i + 1], true)
          if not main and p[2][i] == lines[1] then main = p end
        end
      end
      main = main or parcels[1]
      -- gifts: from the main (first) line's warehouse, when it and the total still have them
      local given, oos = {}, {}
      local wh = whs[main[1][1]]
      for i = 1, #gifts, 2 do
        local sku, qty = gifts[i], gifts[i + 1]
        local s = stock[sku]
        if not s.p then
          given[#given + 1] = sku  -- no stock record: shipped, not counted
          given[#given + 1] = qty
        elseif sellable(s) >= qty and (not s.tracked or s.avail[wh] >= qty) then
          allocate(sku, wh, key, qty, false)
          given[#given + 1] = sku
          given[#given + 1] = qty
        else
          oos[#oos + 1] = sku
          redis.call('HINCRBY', KEYS[3], sku, 1)
        end
      end
      -- the record: outcome, freight, picks, gifts out of stock, route JSON (tab-separated)
      local route, picks = '', ''
      if routing then
        local docs, names = {}, {}
        for i, p in ipairs(parcels) do
          local what = p[2] == lines and o[8] or items(p[2])  -- (Python rendered the whole order's)
          local extra = ''
          if p == main then extra = #given == #gifts and o[9] or items(given) end
          docs[i] = (p[3] and p[1][7] or p[1][6]) .. p[4] .. '|' .. what .. '|' .. extra
          names[i] = whs[p[1][1]]
        end
        route, picks = table.concat(docs, ';'), table.concat(names, ',')
      end
      local rec = 's\t' .. freight .. '\t' .. picks .. '\t' .. table.concat(oos, ',') .. '\t' .. route
      local nb = new_recs[bucket_of[n]] or {}
      new_recs[bucket_of[n]] = nb
      nb[#nb + 1] = key
      nb[#nb + 1] = rec
      out[n] = rec
      routed[key] = rec
    end
  end
end

-- 3. write back, once per key
for sku, s in pairs(stock) do
  local k, at = sku_keys[sku][1], sku_keys[sku][2]
  if s.dr ~= 0 then redis.call('HINCRBY', KEYS[k], 'r', s.dr) end
  for wh, q in pairs(s.da) do
    redis.call('HINCRBY', KEYS[k], 'a:' .. wh, q)
    if not s.counted[wh] then redis.call('SADD', KEYS[3 + wh_index[wh]], sku) end  -- (a count lists it)
  end
  local set, del = {}, {}
  for _, key in ipairs(holders[sku]) do
    local q = s.h[key]
    if q ~= s.h0[key] then
      s.h0[key] = q  -- (a key listed twice is written once)
      if q > 0 then
        set[#set + 1] = key
        set[#set + 1] = q
      else
        del[#del + 1] = key
      end
    end
  end
  write('HSET', KEYS[k + 1], set, 2)
  write('HDEL', KEYS[k + 1], del, 1)
  for wh, m in pairs(s.hw) do
    local flat = {}
    for key, q in pairs(m) do
      flat[#flat + 1] = key
      flat[#flat + 1] = q
    end
    write('HSET', KEYS[at[wh]], flat, 2)
  end
end
local open_new = {}  -- every new route, kept open until its order is executed
for b, flat in pairs(new_recs) do
  write('HSET', KEYS[b], flat, 2)
  redis.call('EXPIRE', KEYS[b], ttl)
  for i = 1, #flat do open_new[#open_new + 1] = flat[i] end
end
write('HSET', OPEN, open_new, 2)
if #closing > 0 then  -- (an order of this very batch is not closed: it is being routed again)
  local here, gone = {}, {}
  for _, o in ipairs(orders) do here[o[1]] = true end
  for _, key in ipairs(closing) do
    if not here[key] then gone[#gone + 1] = key end
  end
  write('HDEL', OPEN, gone, 1)
end
return cmsgpack.pack(out)
