-- Take warehouses out of the ledger before they leave the warehouse set (issue 13), or refuse:
-- a warehouse that still counts stock (physical above 0) or has open allocations (units routed
-- there that no count of it has settled yet) is not removed, so nothing is left where no count
-- can reach it. All or nothing, atomically with route.lua and restock.lua (same slot). Removed:
-- its count and allocation fields and holders go (all 0 or empty), its id joins wh:retired
-- (route.lua never picks it again); an id set again leaves wh:retired.
-- KEYS[1] a key of the ledger slot (routing); ARGV[1] ledger prefix, ARGV[2] n, ARGV[3..2+n]
--   the warehouses to remove, ARGV[3+n..] the warehouses of the new set
-- Returns {} when done, else {problems, {warehouse, sku, physical, allocated, orders holding}
--   ...} with at most MAX_LISTED of them listed
local P = ARGV[1]
local n = tonumber(ARGV[2])
local MAX_LISTED = 100
local problems, listed = 0, {}
local skus_of = {}
for i = 3, 2 + n do
  local wh = ARGV[i]
  local skus = redis.call('SMEMBERS', P .. 'wh:' .. wh .. ':skus')
  skus_of[wh] = skus
  for _, sku in ipairs(skus) do
    local v = redis.call('HMGET', P .. 'sku:' .. sku, 'w:' .. wh, 'a:' .. wh)
    local physical, allocated = tonumber(v[1] or 0), tonumber(v[2] or 0)
    local holding = redis.call('HLEN', P .. 'sku:' .. sku .. ':h:' .. wh)
    if physical > 0 or allocated > 0 or holding > 0 then
      problems = problems + 1
      if #listed < MAX_LISTED then listed[#listed + 1] = {wh, sku, physical, allocated, holding} end
    end
  end
end
if problems > 0 then return {problems, listed} end
for wh, skus in pairs(skus_of) do
  for _, sku in ipairs(skus) do
    redis.call('HDEL', P .. 'sku:' .. sku, 'w:' .. wh, 'a:' .. wh)
  end
  redis.call('DEL', P .. 'wh:' .. wh .. ':skus')
  redis.call('SADD', P .. 'wh:retired', wh)
end
for i = 3 + n, #ARGV do redis.call('SREM', P .. 'wh:retired', ARGV[i]) end
return {}
