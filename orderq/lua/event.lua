-- One order event from a system downstream (contract §5: carrier, wms, erp, channel), applied
-- to the order's status record atomically, so concurrent events of one order never interleave:
-- dedup, the timeline, each source's word, the shipments, the public status by trust, the
-- conflicts, the effects of a shipment (outbox + effect ledger, as execute.lua does for actions)
-- and, for a return, the units owed back to stock.
-- Dedup: field ev:<source>|<status>|<tracking no> (HSETNX): a replay changes nothing.
-- Public status: a status moves forward (executed < shipped < delivered < return_requested <
-- returned) on any source's word; it moves back only on the word of a source more trusted than
-- the one that set it; 'returned' never moves back (its units are counted back). Every word
-- refused, and every word a more trusted source overrode, is kept in the conflicts.
-- An order in 'intercepting' (its cancel came after the pick) ends here: 'intercepted' ->
-- cancelled (what it holds is owed back: KEYS[6], released by the caller), 'intercept_failed'
-- or any word that the parcel left -> shipped. Events for an order not executed yet, or cancelled, are recorded
-- (timeline, sources, conflicts) but move nothing.
-- Effects, each once per order in effect (ledger field HSETNX + outbox XADD + apply count):
-- channel.ship_sync (the tracking number back to the platform) on the first shipped,
-- intercept_failed or delivered word that carries a tracking number; notify.sms of kind
-- 'shipped' on the first shipped or intercept_failed word.
-- Returns: the transition to 'returned' writes the units to give back (ARGV[11]) into the
-- partition's owed-returns hash; the caller settles them in the ledger slot and deletes the
-- field (orderq/lifecycle.py), and a sweep completes what a crash left in between.
-- TTL (contract §5): counts from the last event of an executed/shipped order, from delivered or
-- returned; an order leaving 'intercepting' starts it, unless a dead letter of it is unresolved
-- or a deferred sync is owed (those scripts start it later).
-- KEYS[1] status record, KEYS[2] partition counters, KEYS[3] outbox notify.sms,
-- KEYS[4] outbox channel.ship_sync, KEYS[5] owed returns (hash order key -> items), KEYS[6] owed
--   cancel releases (hash order key -> "<seq>|<accepted us>|<payload>", orderq/lifecycle.py),
--   KEYS[7] executed orders not shipped yet (zset, the ship_lag alert's), KEYS[8] the order's
--   payload key (keys.Partition.payload: what the shipment's effects carry), whose TTL is the
--   record's: set here wherever the record's is
-- ARGV[1] source, [2] event status, [3] at (UTC text), [4] carrier, [5] tracking no,
--   [6] warehouse, [7] sources, most trusted first ("carrier,wms,erp,channel"), [8] status TTL
--   (s), [9] outbox trim per action ("name=maxlen,..."), [10] order key, [11] units to give
--   back on 'returned' ("<sku>\t<qty>\t<warehouse>\n...", '' none)
-- Counters (KEYS[2]): events, event_conflicts, and each state entered (shipped, delivered,
--   return_requested, returned, intercepted, intercept_failed)
-- Returns {outcome ('applied' | 'duplicate' | 'missing'), public status, status before,
--   conflict 0/1, return owed 0/1, cancel owed 0/1}
local status = KEYS[1]
local src, est, at, carrier, tracking, wh = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local key = ARGV[10]
local cur, setter, fid, payload = unpack(redis.call('HMGET', status, F.status, F.status_source,
                                                      F.fulfilment_id, F.payload))
-- (a record written before payloads had their own key keeps its payload in the hash)
payload = redis.call('GET', KEYS[8]) or payload
if not cur then return {'missing', '', '', 0, 0, 0} end
if redis.call('HSETNX', status, F.event .. src .. '|' .. est .. '|' .. tracking, at) == 0 then
  return {'duplicate', cur, cur, 0, 0, 0}
end
setter = setter or ''
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local rank = {}
local n = 0
for name in string.gmatch(ARGV[7], '[^,]+') do
  n = n + 1
  rank[name] = n
end
local function more_trusted(a, b)  -- a's word beats b's ('' none: anyone's does)
  return b == '' or (rank[a] or 99) < (rank[b] or 99)
end
local function json_list(field)
  local v = redis.call('HGET', status, field)
  if v and v ~= '' then return cjson.decode(v) end
  return {}
end
local function opt(v) if v == '' then return cjson.null end return v end

-- 1. the timeline, and this source's latest word
local tl = json_list(F.timeline)
tl[#tl + 1] = {source = src, status = est, at = at, carrier = opt(carrier), tracking_no = opt(tracking),
               warehouse = opt(wh)}
local TIMELINE_MAX = 200  -- a misbehaving source cannot grow a record without bound
if #tl > TIMELINE_MAX then table.remove(tl, 1) end
redis.call('HSET', status, F.timeline, cjson.encode(tl))
local so = json_list(F.sources)
if not so[src] or so[src].at <= at then
  so[src] = {status = est, at = at}
  redis.call('HSET', status, F.sources, cjson.encode(so))
end

-- 2. the shipments: one per tracking number
local parcel_left = est == 'shipped' or est == 'intercept_failed' or est == 'delivered'
local shipment = nil
if parcel_left and tracking ~= '' then
  local sh = json_list(F.shipments)
  for _, s in ipairs(sh) do
    if s.tracking_no == tracking then shipment = s end
  end
  if not shipment then
    shipment = {warehouse = opt(wh), carrier = opt(carrier), tracking_no = tracking, at = at}
    sh[#sh + 1] = shipment
    redis.call('HSET', status, F.shipments, cjson.encode(sh))
  end
end

-- 3. the public status
local STEP = {executed = 0, packed = 1, shipped = 2, delivered = 3, return_requested = 4, returned = 5}
local TIME_OF = {shipped = F.shipped_at, delivered = F.delivered_at, return_requested = F.return_requested_at,
                 returned = F.returned_at}
local target = est
if est == 'intercept_failed' then target = 'shipped' end
local new = cur
local conflict = nil  -- {kept source, kept status, other source, other status}
local cancel_owed = 0
if cur == 'intercepting' then
  if est == 'intercepted' then
    new = 'cancelled'
    cancel_owed = 1
  elseif STEP[target] and STEP[target] >= STEP.shipped then
    new = target  -- the parcel left: the interception failed
  end
elseif STEP[cur] and STEP[target] and cur ~= 'returned' then
  if STEP[target] > STEP[cur] then
    if target ~= 'packed' then new = target end
  elseif target ~= cur and src ~= setter then
    if more_trusted(src, setter) and target ~= 'packed' then
      conflict = {src, target, setter, cur}  -- a more trusted source corrects a less trusted one
      new = target
    else
      conflict = {setter, cur, src, est}  -- a less trusted source never moves it back
    end
  end
elseif STEP[cur] and cur == 'returned' and STEP[target] and target ~= 'returned' and src ~= setter then
  conflict = {setter, cur, src, est}
elseif cur == 'cancelled' and parcel_left then
  conflict = {setter, cur, src, est}  -- cancelled, yet a source says the parcel left
end
if conflict then
  local cf = json_list(F.conflicts)
  local kept_source = conflict[1] ~= '' and conflict[1] or cjson.null
  cf[#cf + 1] = {at = at, kept = {source = kept_source, status = conflict[2]},
                 other = {source = conflict[3], status = conflict[4]}}
  if #cf > TIMELINE_MAX then table.remove(cf, 1) end
  redis.call('HSET', status, F.conflicts, cjson.encode(cf))
  redis.call('HINCRBY', KEYS[2], 'event_conflicts', 1)
end
local counted = {}
if new ~= cur then
  redis.call('HSET', status, F.status, new, F.status_source, src)
  -- a state is counted (and timed) when the order first enters it: a correction back and forth
  -- counts nothing twice. An intercepted order was counted executed: it counts 'intercepted',
  -- never 'cancelled' too, so the audit's accepted = executed + rejected + cancelled + owed holds.
  if TIME_OF[new] and redis.call('HSETNX', status, TIME_OF[new], now_us) == 1 then
    counted[#counted + 1] = new
  end
  if cur == 'intercepting' then
    redis.call('HSET', status, F.cancel_outcome, new == 'cancelled' and 'cancelled' or 'intercept_failed')
    counted[#counted + 1] = new == 'cancelled' and 'intercepted' or 'intercept_failed'
  end
  if new == 'cancelled' then
    -- what the order holds in the ledger is released by the caller, once (orderq/lifecycle.py)
    redis.call('HSET', status, F.cancelled_at, now_us)
    local seq = redis.call('HINCRBY', KEYS[2], 'cancel_seq', 1)
    local ta = redis.call('HGET', status, F.accepted_at) or '0'
    redis.call('HSET', KEYS[6], key, seq .. '|' .. ta .. '|' .. (payload or ''))
  end
elseif STEP[cur] and target == cur and src ~= setter and more_trusted(src, setter) then
  redis.call('HSET', status, F.status_source, src)  -- the same word, from a more trusted source
end
redis.call('HINCRBY', KEYS[2], 'events', 1)
for _, name in ipairs(counted) do redis.call('HINCRBY', KEYS[2], name, 1) end

-- 4. effects of a shipment, each once in effect
local live = (STEP[cur] ~= nil or cur == 'intercepting') and new ~= 'cancelled'  -- executed, not cancelled
local trim = {}
for name, m in string.gmatch(ARGV[9], '([^=,]+)=(%d+)') do
  if m ~= '0' then trim[name] = m end
end
local function fire(k, action, kind)  -- KEYS[k] its outbox; kind: '' the action's own effect, else a second one
  local ledger = kind == '' and action or (action .. ':' .. kind)
  if redis.call('HSETNX', status, F.action .. ledger, 'done') == 0 then return end
  local s = shipment or {warehouse = opt(wh), carrier = opt(carrier), tracking_no = opt(tracking), at = at}
  local entry = {'k', key, 'f', fid or '', 'd', payload or '', 's', cjson.encode(s)}
  if kind ~= '' then
    entry[#entry + 1] = 'n'
    entry[#entry + 1] = kind
  end
  if trim[action] then
    redis.call('XADD', KEYS[k], 'MAXLEN', '~', trim[action], '*', unpack(entry))
  else
    redis.call('XADD', KEYS[k], '*', unpack(entry))
  end
  redis.call('HINCRBY', status, F.applied .. ledger, 1)  -- apply count: the audit's duplicate check
end
if live and parcel_left then
  if tracking ~= '' then fire(4, 'channel.ship_sync', '') end
  if est ~= 'delivered' then fire(3, 'notify.sms', 'shipped') end
end

-- 5. a return: the units owed back to stock, settled by the caller in the ledger slot
local return_owed = 0
if new == 'returned' and cur ~= 'returned' and ARGV[11] ~= '' then
  redis.call('HSET', KEYS[5], key, ARGV[11])
  return_owed = 1
end

-- 6. the ship_lag alert's view: an order that left 'executed' no longer waits for its shipment
if new ~= 'executed' then redis.call('ZREM', KEYS[7], key) end

-- 7. the TTL
if cur == 'intercepting' and new ~= cur then
  local owed = tonumber(redis.call('HGET', status, F.dead) or '0') > 0
  if not owed then
    local all = redis.call('HGETALL', status)
    for i = 2, #all, 2 do
      if all[i] == 'deferred' and string.sub(all[i - 1], 1, #F.action) == F.action then owed = true end
    end
  end
  if not owed then
    redis.call('EXPIRE', status, ARGV[8])
    redis.call('EXPIRE', KEYS[8], ARGV[8])
  end
elseif redis.call('TTL', status) >= 0 then
  redis.call('EXPIRE', status, ARGV[8])  -- "no event for the TTL": it counts from the last one
  redis.call('EXPIRE', KEYS[8], ARGV[8])
end
return {'applied', new, cur, conflict and 1 or 0, return_owed, cancel_owed}
