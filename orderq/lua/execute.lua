-- Execute a batch of one partition: effect ledger + outbox + status + ack, atomically.
-- Each (order, action) is applied once in effect: the ledger field x:<action> is set only
-- when absent (HSETNX's semantics: read with the order's status in one HMGET, written with its
-- new status in one HSET; the script is atomic) in the same script that appends the outbox
-- entry, so a redelivered batch re-runs harmlessly.
-- A routed order has one pick per warehouse: action wms.pick@<warehouse>, ledger
-- field x:wms.pick@<warehouse>, an outbox entry naming the warehouse ('w') and carrying its
-- parcel of the route ('r'); a split order's picks get fulfilment id <id>-<warehouse>.
-- The order itself is stored once (KEYS[16], order key -> payload), not once per action: each
-- outbox and deferred entry references it ('o') and is counted in KEYS[17]; the scripts that
-- remove such entries count down and delete the copy with the last (orderq/ordercopies.py).
-- KEYS[1] counters, KEYS[2..4] lanes vip/new/regular, KEYS[5] deferred stream,
-- KEYS[6] held zset, KEYS[7] parked payloads, KEYS[8] review zset, KEYS[9..13] outbox
-- streams (ACTIONS order), KEYS[14] errors hash (field "<stream>|<id>"), KEYS[15] releases
-- owed by cancelled orders (hash, orderq/lifecycle.py), KEYS[16] order copies (hash),
-- KEYS[17] their reference counts (hash), then per order 2 keys: its status record and its
-- payload key (keys.Partition.payload)
-- An order cancelled while it waited in its lane (cancel.lua) is skipped and acknowledged: it
-- never executes; what validation (and routing, just before this call) held for it is owed back.
-- An executed order's payload, what an intercept, a shipment and a return carry later, goes to
-- its payload key, not its status record (a long value would make the record a hashtable): set
-- with the record's TTL here, and every script that moves the record's TTL moves the key's.
-- ARGV[1] group, ARGV[2] outbox trim per action ("name=maxlen,..."; 0 or absent: never
--   trimmed, the dispatcher deletes what it delivered; else the oldest go, each counting its
--   copy down), ARGV[3] status TTL (s; counted
--   from 'executed'; none while held, in review or owed a deferred sync), ARGV[4] entries
--   delivered before, whose error record goes now ("<lane>:<id> ..."; '' on a first
--   delivery: nothing to do), then per order 2
--   values: its head "<lane 1..3>\t<entry id>\t<order key>\t<outcome: wire.Executed, e executed
--   | h held | w review (freight over the limit)>\t<fulfilment id>\t<actions: name=state,...>\t<route:
--   wire.RouteParcel texts joined by ';'; '' none>\t<reasons to add: JSON array; '' none>" (none
--   of them holds a tab),
--   and its payload
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local outbox = {['wms.pick'] = KEYS[9], ['notify.sms'] = KEYS[10], ['invoice.request'] = KEYS[11],
                ['crm.remark_sync'] = KEYS[12], ['crm.gift_sync'] = KEYS[13]}
local prio_names = {'vip', 'new', 'regular'}
local trim = {}
for name, n in string.gmatch(ARGV[2], '([^=,]+)=(%d+)') do
  if n ~= '0' then trim[name] = tonumber(n) end
end
local copies, refs = KEYS[16], KEYS[17]
local CHUNK = 1000  -- unpack() has a stack limit: variadic calls go in chunks
local function unref(key)  -- one entry fewer references the order's copy; the last deletes it
  if redis.call('HINCRBY', refs, key, -1) <= 0 then
    redis.call('HDEL', refs, key)
    redis.call('HDEL', copies, key)
  end
end
-- A trimmed outbox (an action without a dispatcher) keeps its newest entries: the oldest go
-- once it is a stream node's worth (SLACK) over, each counting its copy's references down
-- (XADD MAXLEN would drop them without), at most EVICT per call.
local SLACK, EVICT = 100, 1000
local function evict(action)
  local over = redis.call('XLEN', outbox[action]) - trim[action]
  if over <= SLACK then return end
  local ids = {}
  for _, e in ipairs(redis.call('XRANGE', outbox[action], '-', '+', 'COUNT', math.min(over, EVICT))) do
    ids[#ids + 1] = e[1]
    local f, key, ref = e[2], nil, false
    for j = 1, #f, 2 do
      if f[j] == 'k' then key = f[j + 1] elseif f[j] == 'o' then ref = true end
    end
    if ref and key then unref(key) end
  end
  redis.call('XDEL', outbox[action], unpack(ids))
end
local touched = {}  -- trimmed outboxes appended to
local function to_outbox(name, key, fid, route, split)
  local base, wh = string.match(name, '^([^@]+)@?(.*)$')
  local entry = {'*', 'k', key, 'f', fid, 'o', '1'}
  if wh ~= '' then
    if split then entry[5] = fid .. '-' .. wh end
    entry[#entry + 1] = 'w'
    entry[#entry + 1] = wh
    entry[#entry + 1] = 'r'  -- its own parcel of the route
    local pattern = ';(' .. (string.gsub(wh, '%-', '%%-')) .. '|[^;]*)'  -- ('-' is magic in patterns)
    entry[#entry + 1] = string.match(';' .. route, pattern) or ''
  end
  redis.call('XADD', outbox[base], unpack(entry))
  if trim[base] then touched[base] = true end
end
local function with_reasons(have, more)  -- the record's reasons JSON (have) plus more (JSON)
  local list = (have and have ~= '') and cjson.decode(have) or {}
  for _, r in ipairs(cjson.decode(more)) do list[#list + 1] = r end
  if #list == 0 then return '[]' end
  return cjson.encode(list)
end
-- (one argument per order for what is small: redis-py packs each argument at a cost)
local HEAD = '^(%d)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$'
local acks = {{}, {}, {}}
local missing = {}  -- positions (1..) in the batch of entries whose record is missing
local n = {executed = 0, held = 0, deferred = 0, dropped = 0, executed_vip = 0,
           executed_new = 0, executed_regular = 0, review = 0}
for lane, id in string.gmatch(ARGV[4], '(%d):(%S+)') do
  redis.call('HDEL', KEYS[14], KEYS[tonumber(lane) + 1] .. '|' .. id)
end
local owed = 0
-- The order copies and their reference counts are written once per batch (below), in the
-- batch's order (a key twice: its last payload, both counts)
local copy_keys, copy_of, ref_add = {}, {}, {}
-- (tables reused from order to order, read up to their count: no table made per order)
local act, act_state, set = {}, {}, {}
local fields = {F.status, F.reasons}
for i = 18, #KEYS, 2 do
  local a = 5 + (i - 18)  -- (2 keys and 2 values per order)
  local lane, id, key, outcome, fid, actions, route, more = string.match(ARGV[a], HEAD)
  local payload = ARGV[a + 1]
  lane = tonumber(lane)
  local status, payload_key = KEYS[i], KEYS[i + 1]
  local ids = acks[lane]
  -- one read of the record: its status, its reasons, and (to execute) each action's ledger
  -- field and apply count (fields[3..]: x:<action>, xn:<action> per action)
  local na = 0  -- actions: their names in act, states in act_state
  if outcome ~= 'h' and outcome ~= 'w' then
    for name, state in string.gmatch(actions, '([^=,]+)=([^,]+)') do
      na = na + 1
      act[na], act_state[na] = name, state
      fields[na * 2 + 1], fields[na * 2 + 2] = F.action .. name, F.applied .. name
    end
  end
  local rec = redis.call('HMGET', status, unpack(fields, 1, na * 2 + 2))
  local st, reasons = rec[1], rec[2]
  if st then
    ids[#ids + 1] = id
  else
    -- No record: the order's effect ledger is gone (a final state's TTL ran out, or it was
    -- deleted by hand). Executing could repeat effects; acknowledging would lose it without
    -- a trace: the entry stays pending, reported to the worker, which fails it (a dead letter).
    missing[#missing + 1] = (i - 16) / 2
  end
  if st == 'cancelled' then
    local seq = redis.call('HINCRBY', KEYS[1], 'cancel_seq', 1)
    local ta = redis.call('HGET', status, F.accepted_at) or '0'
    redis.call('HSET', KEYS[15], key, seq .. '|' .. ta .. '|' .. payload)
    redis.call('EXPIRE', status, ARGV[3])  -- its entry is gone with this call: final from now
    owed = owed + 1
  elseif st == 'validated' then
    if outcome == 'h' then
      redis.call('HSET', status, F.status, 'held', F.held_at, now_us)
      redis.call('PERSIST', status)
      redis.call('ZADD', KEYS[6], now_us, key)
      redis.call('HSET', KEYS[7], key, payload)
      n.held = n.held + 1
    elseif outcome == 'w' then
      redis.call('HSET', status, F.status, 'review', F.review_at, now_us, F.reasons, with_reasons(reasons, more))
      redis.call('PERSIST', status)
      redis.call('ZADD', KEYS[8], now_us, key)
      redis.call('HSET', KEYS[7], key, payload)
      n.review = n.review + 1
    else
      local _, picks = string.gsub(actions, 'wms%.pick@', '')
      local n_refs = 0  -- entries referencing the order's copy
      local ns = 0  -- the record's fields written (set[1..ns]), in one HSET: the ledger's, then the status
      for j = 1, na do
        local name, state = act[j], act_state[j]
        local have = rec[j * 2 + 1]
        for k = 1, j - 1 do  -- a repeated name finds its ledger field set (HSETNX)
          if act[k] == name then have = true end
        end
        if not have then  -- (HSETNX: only an absent field is set)
          set[ns + 1], set[ns + 2] = fields[j * 2 + 1], state
          ns = ns + 2
          if state == 'done' then
            to_outbox(name, key, fid, route, picks > 1)
            n_refs = n_refs + 1
            -- apply count: the audit's duplicate check (HINCRBY's: as read, plus one)
            set[ns + 1], set[ns + 2] = fields[j * 2 + 2], tonumber(rec[j * 2 + 2] or 0) + 1
            ns = ns + 2
          elseif state == 'deferred' then
            redis.call('XADD', KEYS[5], '*', 'k', key, 'a', name, 'f', fid, 'o', '1')
            n_refs = n_refs + 1
            n.deferred = n.deferred + 1
          elseif state == 'dropped' then
            n.dropped = n.dropped + 1
          end
        end
      end
      if n_refs > 0 then
        if not copy_of[key] then copy_keys[#copy_keys + 1] = key end
        copy_of[key] = payload
        ref_add[key] = (ref_add[key] or 0) + n_refs
      end
      set[ns + 1], set[ns + 2], set[ns + 3], set[ns + 4], set[ns + 5], set[ns + 6] =
        F.status, 'executed', F.executed_at, now_us, F.fulfilment_id, fid
      ns = ns + 6
      if route ~= '' then
        set[ns + 1], set[ns + 2] = F.route, route
        ns = ns + 2
      end
      if more ~= '' then
        set[ns + 1], set[ns + 2] = F.reasons, with_reasons(reasons, more)
        ns = ns + 2
      end
      redis.call('HSET', status, unpack(set, 1, ns))
      if string.find(actions, '=deferred', 1, true) then
        redis.call('PERSIST', status)  -- a deferred sync is owed: replay.lua starts the TTL
        redis.call('SET', payload_key, payload)
      else
        redis.call('EXPIRE', status, ARGV[3])
        redis.call('SET', payload_key, payload, 'EX', ARGV[3])
      end
      n.executed = n.executed + 1
      local pn = 'executed_' .. prio_names[lane]
      n[pn] = n[pn] + 1
    end
  end
end
-- the batch's order copies and their reference counts (HINCRBY's: as read, plus the batch's)
for c = 1, #copy_keys, CHUNK do
  local part, flat = {}, {}
  for j = c, math.min(c + CHUNK - 1, #copy_keys) do
    local key = copy_keys[j]
    part[#part + 1] = key
    flat[#flat + 1] = key
    flat[#flat + 1] = copy_of[key]
  end
  redis.call('HSET', copies, unpack(flat))
  local had = redis.call('HMGET', refs, unpack(part))
  flat = {}
  for j, key in ipairs(part) do
    flat[#flat + 1] = key
    flat[#flat + 1] = tonumber(had[j] or 0) + ref_add[key]
  end
  redis.call('HSET', refs, unpack(flat))
end
for base in pairs(touched) do evict(base) end
for lane = 1, 3 do
  local ids = acks[lane]
  if #ids > 0 then
    redis.call('XACK', KEYS[lane + 1], ARGV[1], unpack(ids))
    redis.call('XDEL', KEYS[lane + 1], unpack(ids))
  end
end
for name, count in pairs(n) do
  if count > 0 then redis.call('HINCRBY', KEYS[1], name, count) end
end
return {n.executed, n.held, n.deferred, n.dropped, now_us, n.review, missing, owed}
