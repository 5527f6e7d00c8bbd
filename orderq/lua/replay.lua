-- Replay deferred non-core syncs once the breaker is back to normal. Idempotent: a sync
-- is applied only while its ledger field still says 'deferred', and only by the call that
-- deletes its deferred entry (XDEL answering 1), so two replays of one entry act once.
-- A deferred entry may reference its order's copy ('o', execute.lua) instead of carrying the
-- payload: the outbox entry replayed from it takes its reference over; one not replayed (its
-- sync is no longer owed) counts the copy's references down, the last one deleting the copy.
-- KEYS[1] deferred stream, KEYS[2] counters, KEYS[3..7] outbox streams (ACTIONS order),
-- KEYS[8] order copies (hash), KEYS[9] their reference counts (hash), then per entry 2 keys: its
-- order's status record and payload key (keys.Partition.payload, whose TTL is the record's)
-- An executed order with a deferred sync is still owed work: its record has no TTL (execute.lua)
-- until its last deferred sync is replayed here; the status TTL counts from then.
-- The outbox entry is the deferred one as it was, every field but its action ('a'): a reference
-- 'o' or a payload 'd', and whatever else it carries, so nothing of it is lost on the way.
-- ARGV[1] outbox trim per action ("name=maxlen,..."; 0 or absent: never trimmed), ARGV[2]
--   status TTL (s), then per entry its id (in the order of their keys)
local outbox = {['wms.pick'] = KEYS[3], ['notify.sms'] = KEYS[4], ['invoice.request'] = KEYS[5],
                ['crm.remark_sync'] = KEYS[6], ['crm.gift_sync'] = KEYS[7]}
local copies, refs = KEYS[8], KEYS[9]
local trim = {}
for name, n in string.gmatch(ARGV[1], '([^=,]+)=(%d+)') do
  if n ~= '0' then trim[name] = tonumber(n) end
end
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
local replayed = 0
local touched = {}
for i = 10, #KEYS, 2 do
  local id = ARGV[3 + (i - 10) / 2]
  local found = redis.call('XRANGE', KEYS[1], id, id)[1]
  if found then  -- (gone: another replay took it)
    redis.call('XDEL', KEYS[1], id)
    local f, entry, key, action, ref = found[2], {'*'}, nil, nil, false
    for j = 1, #f, 2 do
      if f[j] == 'a' then
        action = f[j + 1]
      else
        entry[#entry + 1] = f[j]
        entry[#entry + 1] = f[j + 1]
        if f[j] == 'k' then key = f[j + 1] elseif f[j] == 'o' then ref = true end
      end
    end
    if action and outbox[action] and redis.call('HGET', KEYS[i], F.action .. action) == 'deferred' then
      redis.call('HSET', KEYS[i], F.action .. action, 'done')
      redis.call('XADD', outbox[action], unpack(entry))
      if trim[action] then touched[action] = true end
      redis.call('HINCRBY', KEYS[i], F.applied .. action, 1)  -- apply count: the audit's duplicate check
      replayed = replayed + 1
      local owed = false
      for _, v in ipairs(redis.call('HVALS', KEYS[i])) do
        if v == 'deferred' then owed = true end
      end
      -- (nor while a dispatch dead letter of it is unresolved: deadletter.lua starts it then)
      if not owed and redis.call('HGET', KEYS[i], F.status) == 'executed' and not redis.call('HGET', KEYS[i], F.dead) then
        redis.call('EXPIRE', KEYS[i], ARGV[2])
        redis.call('EXPIRE', KEYS[i + 1], ARGV[2])
      end
    elseif ref and key then
      unref(key)
    end
  end
end
for action in pairs(touched) do evict(action) end
if replayed > 0 then redis.call('HINCRBY', KEYS[2], 'replayed', replayed) end
return replayed
