-- Settle a dispatcher batch of one outbox stream: delivered entries are acknowledged and
-- deleted together (so outbox memory follows the undelivered actions); given-up entries
-- go to the dispatch dead-letter stream, their action is marked failed in the status
-- record, and they leave the outbox. XACK answering 1 makes each dead letter happen once,
-- even if two dispatchers race for one entry.
-- A routed pick (execute.lua) names its warehouse ('w') and carries its parcel ('r'): the
-- dead letter keeps both, so a replay delivers that pick again, and the failed ledger field
-- is that pick's own, x:wms.pick@<warehouse>.
-- A record with an unresolved dead letter never expires (contract §5): it loses its TTL here
-- and counts its unresolved dispatch dead letters in 'dl'; resolving the last one
-- (deadletter.lua) starts the status TTL again.
-- KEYS[1] outbox stream, KEYS[2] dispatch dead-letter stream, KEYS[3] counters,
-- KEYS[4..] status record per given-up entry
-- ARGV[1] group, ARGV[2] action, ARGV[3] n delivered, ARGV[4..3+n] their ids, then per
--   given-up entry 8 values: id, order key, fulfilment id, payload, attempts, last error,
--   warehouse ('' not a routed pick), parcel
local group, action, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
if n > 0 then
  local ids = {}
  for i = 1, n do ids[i] = ARGV[3 + i] end
  redis.call('XACK', KEYS[1], group, unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
  redis.call('HINCRBY', KEYS[3], 'dispatched', n)
end
local dead = 0
local a = 4 + n
for k = 4, #KEYS do
  local id, key, fid, payload, attempts, err = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local wh, parcel = ARGV[a + 6], ARGV[a + 7]
  a = a + 8
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    local letter = {'*', 'stream', KEYS[1], 'id', id, 'action', action, 'k', key, 'f', fid,
                    'deliveries', attempts, 'error', err, 'd', payload}
    if wh ~= '' then
      for _, v in ipairs({'w', wh, 'r', parcel}) do letter[#letter + 1] = v end
    end
    redis.call('XADD', KEYS[2], unpack(letter))
    redis.call('XDEL', KEYS[1], id)
    -- (a record, and a hash: a corrupt entry's key may name anything, and must not stop the batch)
    if redis.call('TYPE', KEYS[k]).ok == 'hash' then
      redis.call('HSET', KEYS[k], wh ~= '' and ('x:' .. action .. '@' .. wh) or ('x:' .. action), 'failed')
      redis.call('HINCRBY', KEYS[k], 'dl', 1)
      redis.call('PERSIST', KEYS[k])
    end
    dead = dead + 1
  end
end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead_letters', dead) end
return {n, dead}
