-- Recovery sweep of one stream: claim entries idle past the lease (XPENDING IDLE, paged to
-- the end or the limit, then XCLAIM) for this consumer, except those this process is working
-- on right now (ARGV[7..]): with several loops per worker, one loop's sweep would otherwise
-- take back another loop's batch that outlasted the lease on a loaded machine, delivering it
-- twice and counting a delivery against it. An entry delivered more than the limit goes to
-- the dead-letter stream with its last error, but only if its processing recorded an error
-- of its own: deliveries that failed because the server refused writes (out of memory) or a
-- worker died are not the entry's fault. Past the hard limit it goes anyway (a worker that
-- dies on it every time records nothing).
-- KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3] counters, KEYS[4] errors hash
-- (field "<stream>|<id>": the streams of a partition can hold entries with the same id)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle (ms), ARGV[4] max deliveries,
-- ARGV[5] limit (entries claimed per call), ARGV[6] hard limit of deliveries,
-- ARGV[7..] ids of this stream in flight in this process
-- Returns {claimed entries as {id, {field, value, ...}}, dead-lettered count, cursor}
local group, consumer, max_deliveries, limit = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local hard_limit = tonumber(ARGV[6] or ARGV[4])
local busy = {}
for i = 7, #ARGV do busy[ARGV[i]] = true end
local cursor = '-'
local claimed = {}
local dead = 0
local last_page
repeat
  local page = redis.call('XPENDING', KEYS[1], group, 'IDLE', ARGV[3], cursor, '+', 100)
  for _, p in ipairs(page) do
    local id = p[1]
    cursor = '(' .. id
    -- a deleted entry comes back empty (and leaves the pending list)
    local got = (not busy[id]) and redis.call('XCLAIM', KEYS[1], group, consumer, ARGV[3], id)[1]
    if got then
      local fields = got[2]
      local deliveries = tonumber(p[4]) + 1
      local err_field = KEYS[1] .. '|' .. id
      local err = deliveries > max_deliveries and redis.call('HGET', KEYS[4], err_field)
      if err or deliveries > hard_limit then
        err = err or ('delivered ' .. deliveries .. ' times without completing')
        local rec = {'stream', KEYS[1], 'id', id, 'deliveries', deliveries, 'error', err}
        for j = 1, #fields do rec[#rec + 1] = fields[j] end
        redis.call('XADD', KEYS[2], '*', unpack(rec))
        redis.call('XACK', KEYS[1], group, id)
        redis.call('XDEL', KEYS[1], id)
        redis.call('HDEL', KEYS[4], err_field)
        dead = dead + 1
      else
        claimed[#claimed + 1] = got
      end
    end
    if #claimed >= limit then break end
  end
  last_page = #page < 100
until last_page or #claimed >= limit
if last_page and #claimed < limit then cursor = '0-0' end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead_letters', dead) end
return {claimed, dead, cursor}
