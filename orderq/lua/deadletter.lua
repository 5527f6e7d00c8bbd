-- An operator resolves one dead letter of one partition (orderq/deadletters.py), atomically:
-- 'replay' puts the entry back on the stream it failed in (a new id, read by that stage's
-- consumer group like any new entry; the effect ledger makes the re-run harmless), 'discard'
-- settles it for good. Both delete it from its dead-letter stream in this same call, so
-- "unresolved" is exactly "still in a dead-letter stream", and a second call on the same id
-- finds nothing (no double entry).
-- KEYS[1] dead-letter stream, KEYS[2] counters, KEYS[3] the order's status record,
-- KEYS[4] releases owed (hash), KEYS[5] order copies (hash), KEYS[6] their reference counts
-- (hash), KEYS[7] the order's payload key (keys.Partition.payload, whose TTL is the record's),
-- KEYS[#KEYS] releases owed by cancelled orders (hash, orderq/lifecycle.py),
-- KEYS[8..#KEYS-1] the streams the entry may have come from (the stage's own: the intake; the
-- three ready lanes; the action outboxes)
-- A dispatch dead letter may reference its order's copy ('o', execute.lua) instead of carrying
-- it: a replay hands the reference on to the entry it puts back; a discard counts the copy's
-- references down, the last one deleting the copy.
-- ARGV[1] replay | discard, ARGV[2] dead-letter entry id, ARGV[3] its order key as read (an
-- entry that no longer matches is not touched), ARGV[4] stage (validate | execute |
-- dispatch), ARGV[5] dispatch: the entry's ledger field ('x:<action>', 'x:<action>@<warehouse>'
-- or 'x:<action>:<kind>', as dispatched.lua marked it),
-- ARGV[6] status TTL (s), ARGV[7] discard: the operator's reason, ARGV[8] discard: what the
-- order holds in the validation ledger (msgpack for orderq/deadletters.py; '' nothing)
-- Returns {0} unknown or resolved already; {-1} its stream is none of KEYS[8..] (replay);
--   else {1, status of the order after ('' no record)}
-- A record keeps no TTL while a dead letter of its order is unresolved (contract §5): a
-- dispatch dead letter took it away (dispatched.lua, counting them in F.dead); resolving the
-- last one (a replay puts the action on its way again, as when it was first issued; a discard
-- ends it) starts the status TTL again, ARGV[6], unless the order still waits or is owed a
-- deferred sync (replay.lua starts it then).
local op, id, key, stage, field = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local found = redis.call('XRANGE', KEYS[1], id, id)
if #found == 0 then return {0} end
local f = found[1][2]
local fields = {}
for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
if fields['k'] ~= key then return {0} end
local status = KEYS[3]
-- (a record, and a hash: an entry's key may name anything, and must not stop the operator)
local kind = redis.call('TYPE', status).ok
local st = kind == 'hash' and redis.call('HGET', status, F.status) or nil
local WAITING = {accepted = true, validated = true, review = true, held = true}
local function dispatch_resolved()  -- one dispatch dead letter of the order less
  if not st then return end
  if redis.call('HINCRBY', status, F.dead, -1) > 0 then return end
  redis.call('HDEL', status, F.dead)
  if WAITING[st] then return end
  for _, v in ipairs(redis.call('HVALS', status)) do
    if v == 'deferred' then return end
  end
  redis.call('EXPIRE', status, ARGV[6])
  redis.call('EXPIRE', KEYS[7], ARGV[6])
end

if op == 'replay' then
  local dest = nil
  for i = 8, #KEYS - 1 do
    if KEYS[i] == fields['stream'] then dest = KEYS[i] end
  end
  if not dest then return {-1} end
  -- the entry as it was: everything but what the dead-letter stream added
  local meta = {stream = true, id = true, deliveries = true, error = true, action = true}
  local entry = {}
  for i = 1, #f, 2 do
    if not meta[f[i]] then
      entry[#entry + 1] = f[i]
      entry[#entry + 1] = f[i + 1]
    end
  end
  redis.call('XADD', dest, '*', unpack(entry))
  if stage == 'dispatch' and st then
    if redis.call('HGET', status, field) == 'failed' then
      redis.call('HSET', status, field, 'done')  -- on its way again, as when it was first issued
    end
    dispatch_resolved()
  end
  redis.call('HINCRBY', KEYS[2], 'dead_replayed', 1)
else
  if stage == 'dispatch' then
    if st then
      redis.call('HSET', status, field, 'failed')
      dispatch_resolved()
    end
    if fields['o'] and redis.call('HINCRBY', KEYS[6], key, -1) <= 0 then  -- its copy: one reference fewer
      redis.call('HDEL', KEYS[6], key)
      redis.call('HDEL', KEYS[5], key)
    end
  elseif kind ~= 'hash' and kind ~= 'none' then
    -- not a status record: nothing of the order to settle
  elseif (stage == 'validate' and (st == 'accepted' or not st)) or (stage == 'execute' and st == 'validated') then
    -- still owed by this stage: the order ends rejected, reason 'discarded'
    local t = redis.call('TIME')
    local have = redis.call('HGET', status, F.reasons)
    local reasons = (have and have ~= '' and have ~= '[]') and cjson.decode(have) or {}
    reasons[#reasons + 1] = 'discarded'
    redis.call('HSET', status, F.status, 'rejected', F.rejected_at, t[1] * 1000000 + t[2],
               F.reasons, cjson.encode(reasons), F.discard_reason, ARGV[7])
    redis.call('EXPIRE', status, ARGV[6])  -- a final state: its TTL counts from now
    redis.call('HINCRBY', KEYS[2], 'rejected', 1)
    if ARGV[8] ~= '' then redis.call('HSET', KEYS[4], key, ARGV[8]) end  -- released next, in the ledger slot
    st = 'rejected'
  elseif st == 'cancelled' and (stage == 'validate' or stage == 'execute') and fields['d'] then
    -- cancelled while its entry was a dead letter (cancel.lua kept its record for the entry):
    -- the discard ends the entry, and what the order may hold is owed back like a skipped one's
    local seq = redis.call('HINCRBY', KEYS[2], 'cancel_seq', 1)
    redis.call('HSET', KEYS[#KEYS], key, seq .. '|' .. (fields['ta'] or '0') .. '|' .. fields['d'])
    redis.call('EXPIRE', status, ARGV[6])
  end
  -- (an order past this stage already, e.g. a stale duplicate entry: only the dead letter goes)
  redis.call('HINCRBY', KEYS[2], 'dead_discarded', 1)
end
redis.call('XDEL', KEYS[1], id)
redis.call('HINCRBY', KEYS[2], 'dead_resolved', 1)
return {1, st or ''}
