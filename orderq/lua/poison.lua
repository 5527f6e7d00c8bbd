-- Dead-letter entries of one stream at once, each with its own error: entries that failed
-- alone (a payload that breaks a rule, a bug) while their batch-mates went on, so they wait
-- for no delivery limit. The record is the one the recovery sweep writes (reclaim.lua): the
-- entry's own fields plus stream, id, deliveries and error. Only an entry still pending in
-- the group moves (another worker may have settled it meanwhile); its error record goes.
-- KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3] counters, KEYS[4] errors hash
-- (field "<stream>|<id>")
-- ARGV[1] group, then per entry 2 values: its id and its error
-- Returns the number of entries dead-lettered
local group = ARGV[1]
local dead = 0
for i = 2, #ARGV, 2 do
  local id, err = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if p[1] then
    local found = redis.call('XRANGE', KEYS[1], id, id)
    if found[1] then
      local rec = {'stream', KEYS[1], 'id', id, 'deliveries', p[1][4], 'error', err}
      for _, v in ipairs(found[1][2]) do rec[#rec + 1] = v end
      redis.call('XADD', KEYS[2], '*', unpack(rec))
      dead = dead + 1
    end
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
  end
  redis.call('HDEL', KEYS[4], KEYS[1] .. '|' .. id)
end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead_letters', dead) end
return dead
