-- What `orderq audit` (and the client-side oracle) reads of status records of one partition:
-- one call per SCAN step, instead of one HGETALL per record from Python. Read only.
-- KEYS[1] review zset, KEYS[2] held zset, KEYS[3] parked payloads, KEYS[4..] status record
-- per order; ARGV[1] the length of the status records' prefix (what precedes the order key)
-- Returns per record {} when there is none, else {status, place, field, value, ...}: place is
--   what a review or held order has of its place (0 not in its set, 1 in it without parked
--   payload, 2 both; 2 for every other status); the fields are those of the effect ledger
--   the duplicate check reads: x:wms.pick*, xn:<action> (apply counts) and rt (the route)
local PICK = F.action .. 'wms.pick'
local out = {}
for i = 4, #KEYS do
  local h = redis.call('HGETALL', KEYS[i])
  local rec = {}
  if #h > 0 then
    local st = 'accepted'
    rec[1], rec[2] = st, 2
    for j = 1, #h, 2 do
      local f = h[j]
      if f == F.status then
        st = h[j + 1]
      elseif f == F.route or string.sub(f, 1, #PICK) == PICK or string.sub(f, 1, #F.applied) == F.applied then
        rec[#rec + 1] = f
        rec[#rec + 1] = h[j + 1]
      end
    end
    rec[1] = st
    if st == 'review' or st == 'held' then
      local key = string.sub(KEYS[i], tonumber(ARGV[1]) + 1)
      if not redis.call('ZSCORE', st == 'review' and KEYS[1] or KEYS[2], key) then
        rec[2] = 0
      elseif redis.call('HEXISTS', KEYS[3], key) == 0 then
        rec[2] = 1
      end
    end
  end
  out[#out + 1] = rec
end
return out
