-- Validate -> ready lanes, atomically for a batch of one partition. Idempotent: an
-- order whose record is past 'accepted' is only acknowledged (a redelivered entry).
-- KEYS[1] intake, KEYS[2] counters, KEYS[3..5] ready lanes vip/new/regular,
-- KEYS[6] review zset, KEYS[7] parked payloads, KEYS[8] errors hash (field "<stream>|<id>"),
-- KEYS[9] releases owed by cancelled orders (hash, orderq/lifecycle.py), KEYS[10..] status record
--   per order
-- An order cancelled while it waited (cancel.lua) is skipped and acknowledged like the others: it
-- never goes on. If the ledger held stock for it (outcome v or w), that release is owed now.
-- ARGV[1] group, ARGV[2] status TTL (s), ARGV[3] ids of entries delivered before, whose error
--   record goes now ("id id ..."; '' on a first delivery: nothing to do), then per order 2
--   values: its head "<entry id>\t<outcome: v validated | r rejected | w review | x
--   unprocessable (rejected; its payload broke the stage, e.g. a rule's arithmetic)>\t
--   <priority: vip|new|regular, '' for x>\t<order key>\t<accept time (us)>\t<risk score>\t
--   <reasons: JSON array>" (no field holds a tab) and its payload (x: the error instead)
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local lanes = {vip = KEYS[3], new = KEYS[4], regular = KEYS[5]}
local LANE_NO = {vip = '1', new = '2', regular = '3'}  -- F.ready_entry: where a cancel finds the entry
local n = {validated = 0, rejected = 0, review = 0, accepted = 0}
local ids = {}
-- (one argument per order for what is small: redis-py packs each argument at a cost)
local HEAD = '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$'
for id in string.gmatch(ARGV[3], '%S+') do redis.call('HDEL', KEYS[8], KEYS[1] .. '|' .. id) end
local owed = 0
for i = 10, #KEYS do
  local a = 4 + (i - 10) * 2
  local id, outcome, prio, key, ta, risk, reasons = string.match(ARGV[a], HEAD)
  local payload = ARGV[a + 1]
  local status = KEYS[i]
  ids[#ids + 1] = id
  local err = nil
  if outcome == 'x' then outcome, err = 'r', payload end  -- rejected, with its error
  local st = redis.call('HGET', status, F.status)
  if st == 'cancelled' then
    if outcome == 'v' or outcome == 'w' then
      local seq = redis.call('HINCRBY', KEYS[2], 'cancel_seq', 1)
      redis.call('HSET', KEYS[9], key, seq .. '|' .. ta .. '|' .. payload)
      owed = owed + 1
    end
    redis.call('EXPIRE', status, ARGV[2])  -- its entry is gone with this call: final from now
  elseif st == 'accepted' or not st then
    if outcome == 'v' then
      local rid = redis.call('XADD', lanes[prio], '*', 'k', key, 'd', payload, 'ta', ta)
      redis.call('HSET', status, F.status, 'validated', F.priority, prio, F.validated_at, now_us, F.reasons, reasons,
                 F.risk_score, risk, F.ready_entry, LANE_NO[prio] .. '|' .. rid)
      n.validated = n.validated + 1
    elseif outcome == 'r' then
      redis.call('HSET', status, F.status, 'rejected', F.priority, prio, F.rejected_at, now_us, F.reasons, reasons,
                 F.risk_score, risk)
      if err then redis.call('HSET', status, F.error, err) end
      n.rejected = n.rejected + 1
    else
      redis.call('HSET', status, F.status, 'review', F.priority, prio, F.review_at, now_us, F.reasons, reasons,
                 F.risk_score, risk)
      redis.call('ZADD', KEYS[6], now_us, key)
      redis.call('HSET', KEYS[7], key, payload)
      n.review = n.review + 1
    end
    if not st then
      redis.call('HSET', status, F.accepted_at, ta)
      -- No record: deleted by hand while its entry waited (counted accepted then), or a crash
      -- took the intake script itself (durability fast: its last seconds of writes) after this
      -- worker had read the entry. Then the entry is gone too, and the order, rebuilt here,
      -- is counted accepted here (the audit reconciles the counters with the records).
      if #redis.call('XRANGE', KEYS[1], id, id) == 0 then n.accepted = n.accepted + 1 end
    end
    -- the status TTL counts from a final state only (contract §5); a waiting order's record
    -- has none (PERSIST: a record written before may carry one)
    if outcome == 'r' then redis.call('EXPIRE', status, ARGV[2]) else redis.call('PERSIST', status) end
  end
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
for name, count in pairs(n) do
  if count > 0 then redis.call('HINCRBY', KEYS[2], name, count) end
end
return {n.validated, n.rejected, n.review, owed}
