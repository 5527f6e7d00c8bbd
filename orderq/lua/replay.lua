-- Replay deferred non-core syncs once the breaker is back to normal. Idempotent: a sync
-- is applied only while its ledger field still says 'deferred'.
-- KEYS[1] deferred stream, KEYS[2] counters, KEYS[3..7] outbox streams (ACTIONS order),
-- KEYS[8..] status record per entry
-- An executed order with a deferred sync is still owed work: its record has no TTL (execute.lua)
-- until its last deferred sync is replayed here; the status TTL counts from then.
-- ARGV[1] outbox trim per action ("name=maxlen,..."; 0 or absent: never trimmed), ARGV[2]
--   status TTL (s), then per entry 5 values: entry id, order key, action, fulfilment id, payload
local outbox = {['wms.pick'] = KEYS[3], ['notify.sms'] = KEYS[4], ['invoice.request'] = KEYS[5],
                ['crm.remark_sync'] = KEYS[6], ['crm.gift_sync'] = KEYS[7]}
local trim = {}
for name, n in string.gmatch(ARGV[1], '([^=,]+)=(%d+)') do
  if n ~= '0' then trim[name] = n end
end
local replayed = 0
local ids = {}
for i = 8, #KEYS do
  local a = 3 + (i - 8) * 5
  local id, key, action, fid, payload = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  ids[#ids + 1] = id
  if redis.call('HGET', KEYS[i], 'x:' .. action) == 'deferred' then
    redis.call('HSET', KEYS[i], 'x:' .. action, 'done')
    if trim[action] then
      redis.call('XADD', outbox[action], 'MAXLEN', '~', trim[action], '*', 'k', key, 'f', fid, 'd', payload)
    else
      redis.call('XADD', outbox[action], '*', 'k', key, 'f', fid, 'd', payload)
    end
    redis.call('HINCRBY', KEYS[i], 'xn:' .. action, 1)  -- apply count: the audit's duplicate check
    replayed = replayed + 1
    local owed = false
    for _, v in ipairs(redis.call('HVALS', KEYS[i])) do
      if v == 'deferred' then owed = true end
    end
    -- (nor while a dispatch dead letter of it is unresolved: deadletter.lua starts it then)
    if not owed and redis.call('HGET', KEYS[i], 's') == 'executed' and not redis.call('HGET', KEYS[i], 'dl') then
      redis.call('EXPIRE', KEYS[i], ARGV[2])
    end
  end
end
if #ids > 0 then redis.call('XDEL', KEYS[1], unpack(ids)) end
if replayed > 0 then redis.call('HINCRBY', KEYS[2], 'replayed', replayed) end
return replayed
