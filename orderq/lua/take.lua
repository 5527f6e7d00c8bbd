-- Take the next batch for an executor from one partition's priority lanes: VIP, then
-- new, then regular; a lower lane whose oldest undelivered entry has waited longer than
-- the aging limit is served first, so no class starves.
-- KEYS[1..3] lanes vip/new/regular
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] aging (ms)
-- Returns {{lane, entries}, ...} and, when nothing was taken, {0, last-delivered ids}
local group, consumer, count, aging = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)

local function last_delivered(key)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
  if not ok then return '0-0' end
  for _, g in ipairs(groups) do
    local name, last
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
    end
    if name == group then return last end
  end
  return '0-0'
end

local last = {}
local order = {1, 2, 3}
local oldest = {}
-- (the VIP lane's last-delivered id only matters when nothing is taken: read then)
for lane = 2, 3 do
  last[lane] = last_delivered(KEYS[lane])
  local r = redis.call('XRANGE', KEYS[lane], '(' .. last[lane], '+', 'COUNT', 1)
  if r[1] then
    local ms = tonumber(string.match(r[1][1], '^(%d+)'))
    if now_ms - ms > aging then oldest[lane] = ms end
  end
end
-- aged lanes first, oldest first
local aged = {}
for lane, ms in pairs(oldest) do aged[#aged + 1] = {lane, ms} end
table.sort(aged, function(x, y) return x[2] < y[2] end)
if #aged > 0 then
  order = {}
  local seen = {}
  for _, x in ipairs(aged) do order[#order + 1] = x[1]; seen[x[1]] = true end
  for lane = 1, 3 do if not seen[lane] then order[#order + 1] = lane end end
end

local out = {}
local left = count
for _, lane in ipairs(order) do
  if left <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', KEYS[lane], '>')
  if r and r[1] then
    local entries = r[1][2]
    if #entries > 0 then
      out[#out + 1] = {lane, entries}
      left = left - #entries
    end
  end
end
if #out == 0 then
  last[1] = last_delivered(KEYS[1])
  return {0, last}
end
return out
