-- Settle a dispatcher batch of one outbox stream: delivered entries are acknowledged and
-- deleted together (so outbox memory follows the undelivered actions); given-up entries
-- go to the dispatch dead-letter stream, their action is marked failed in the status
-- record, and they leave the outbox. XACK answering 1 makes each dead letter happen once,
-- even if two dispatchers race for one entry.
-- An entry that references its order's copy ('o', execute.lua) instead of carrying it: a
-- delivered one counts the copy's references down (XDEL answering 1: once, even in a race),
-- and the last one deletes the copy; a dead letter keeps the reference (and the copy) until an
-- operator resolves it (deadletter.lua).
-- A dead letter is its entry as it was, every field (its key as text; a reference 'o' or a
-- payload 'd'; a routed pick's warehouse 'w' and parcel 'r'; a second effect's kind 'n'; a
-- shipment 's'; a cancel reason 'c'), plus stream, id, action, deliveries and error: a replay
-- (deadletter.lua) puts back exactly what failed. The failed ledger field is the entry's own:
-- x:<action>:<kind> for a second effect (event.lua's x:notify.sms:shipped),
-- x:wms.pick@<warehouse> for a routed pick, else x:<action>. An entry gone from its stream while
-- held (a trimmed outbox evicted it, giving up its copy reference then) is rebuilt from what the
-- dispatcher read, its payload inline.
-- A record with an unresolved dead letter never expires (contract §5): it loses its TTL here
-- and counts its unresolved dispatch dead letters in F.dead; resolving the last one
-- (deadletter.lua) starts the status TTL again. Its payload key (keys.Partition.payload) loses
-- its TTL with it: it lives exactly as long as the record.
-- KEYS[1] outbox stream, KEYS[2] dispatch dead-letter stream, KEYS[3] counters, KEYS[4] order
-- copies (hash), KEYS[5] their reference counts (hash), then per given-up entry 2 keys: its
-- order's status record and payload key
-- ARGV[1] group, ARGV[2] action, ARGV[3] n delivered, then per delivered entry 2 values: its id
--   and its order key if it references the copy ('' if it carried its payload), then per
--   given-up entry 11 values: id, order key, fulfilment id, payload (as sent, also one read from
--   the copy), attempts, last error, warehouse ('' not a routed pick), parcel, kind, shipment,
--   cancel reason (the last five: '' none; fulfilment id, payload and the last five are used
--   only for an entry gone from its stream)
local group, action, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function unref(key)  -- one entry fewer references the order's copy; the last deletes it
  if redis.call('HINCRBY', KEYS[5], key, -1) <= 0 then
    redis.call('HDEL', KEYS[5], key)
    redis.call('HDEL', KEYS[4], key)
  end
end
if n > 0 then
  local ids, plain = {}, {}
  for i = 1, n do
    local id, ref = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
    ids[i] = id
    if ref == '' then
      plain[#plain + 1] = id
    elseif redis.call('XDEL', KEYS[1], id) == 1 then
      unref(ref)
    end
  end
  redis.call('XACK', KEYS[1], group, unpack(ids))
  if #plain > 0 then redis.call('XDEL', KEYS[1], unpack(plain)) end
  redis.call('HINCRBY', KEYS[3], 'dispatched', n)
end
local dead = 0
local a = 4 + 2 * n
for k = 6, #KEYS, 2 do
  local id, attempts, err = ARGV[a], ARGV[a + 4], ARGV[a + 5]
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    local letter = {'*', 'stream', KEYS[1], 'id', id, 'action', action, 'deliveries', attempts, 'error', err}
    local found = redis.call('XRANGE', KEYS[1], id, id)[1]
    local fields = found and found[2]
    if not fields then  -- gone from its stream: what the dispatcher read, its payload inline
      fields = {'k', ARGV[a + 1], 'f', ARGV[a + 2], 'd', ARGV[a + 3]}
      for i, name in ipairs({'w', 'r', 'n', 's', 'c'}) do
        if ARGV[a + 5 + i] ~= '' then
          fields[#fields + 1] = name
          fields[#fields + 1] = ARGV[a + 5 + i]
        end
      end
    end
    local wh, kind = '', ''
    for i = 1, #fields, 2 do
      local name, v = fields[i], fields[i + 1]
      -- (its key as the dispatcher read it, as text: the one its record and an operator use)
      if name == 'k' then v = ARGV[a + 1] elseif name == 'w' then wh = v elseif name == 'n' then kind = v end
      letter[#letter + 1] = name
      letter[#letter + 1] = v
    end
    redis.call('XADD', KEYS[2], unpack(letter))
    redis.call('XDEL', KEYS[1], id)
    local ledger = action
    if kind ~= '' then ledger = action .. ':' .. kind elseif wh ~= '' then ledger = action .. '@' .. wh end
    -- (a record, and a hash: a corrupt entry's key may name anything, and must not stop the batch)
    if redis.call('TYPE', KEYS[k]).ok == 'hash' then
      redis.call('HSET', KEYS[k], F.action .. ledger, 'failed')
      redis.call('HINCRBY', KEYS[k], F.dead, 1)
      redis.call('PERSIST', KEYS[k])
      redis.call('PERSIST', KEYS[k + 1])
    end
    dead = dead + 1
  end
  a = a + 11
end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead_letters', dead) end
return {n, dead}
