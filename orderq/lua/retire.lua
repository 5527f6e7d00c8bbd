-- Take warehouses out of the ledger before they leave the warehouse set, or refuse: a
-- warehouse that still counts stock (physical above 0) or has open allocations (units routed
-- there that no count of it has settled yet) is not removed, so nothing is left where no count
-- can reach it. All or nothing, atomically with route.lua and restock.lua (same slot). Removed:
-- its count and allocation fields and holders go (all 0 or empty), its id joins the retired set
-- (route.lua never picks it again); an id set again leaves it.
-- Every key comes in KEYS, built by orderq/warehouses.py from each warehouse's SKU set as read
-- just before: KEYS[1] the retired set, then per removed warehouse its SKU set, then per SKU of
-- it the SKU's stock hash and its holders hash in that warehouse.
-- ARGV[1] n removed, then per removed warehouse: its id, m, its SKUs x m; then the warehouses
--   of the new set
-- Returns {} when done; {-1} when a SKU set changed since it was read (read again and retry);
--   else {problems, {warehouse, sku, physical, allocated, orders holding} ...} with at most
--   MAX_LISTED of them listed
local MAX_LISTED = 100
local problems, listed = 0, {}
local removed = {}  -- {id =, set = its SKU set, at = the KEYS index of that set, n = its SKUs}
local a, k = 2, 2
for _ = 1, tonumber(ARGV[1]) do
  local wh, m = ARGV[a], tonumber(ARGV[a + 1])
  local w = {id = wh, set = KEYS[k], at = k, n = m}
  if redis.call('SCARD', KEYS[k]) ~= m then return {-1} end
  for j = 1, m do
    local sku, skey, hkey = ARGV[a + 1 + j], KEYS[k + 2 * j - 1], KEYS[k + 2 * j]
    if redis.call('SISMEMBER', KEYS[k], sku) == 0 then return {-1} end
    local v = redis.call('HMGET', skey, 'w:' .. wh, 'a:' .. wh)
    local physical, allocated = tonumber(v[1] or 0), tonumber(v[2] or 0)
    local holding = redis.call('HLEN', hkey)
    if physical > 0 or allocated > 0 or holding > 0 then
      problems = problems + 1
      if #listed < MAX_LISTED then listed[#listed + 1] = {wh, sku, physical, allocated, holding} end
    end
  end
  removed[#removed + 1] = w
  a = a + 2 + m
  k = k + 1 + 2 * m
end
if problems > 0 then return {problems, listed} end
for _, w in ipairs(removed) do
  for j = 1, w.n do redis.call('HDEL', KEYS[w.at + 2 * j - 1], 'w:' .. w.id, 'a:' .. w.id) end
  redis.call('DEL', w.set)
  redis.call('SADD', KEYS[1], w.id)
end
for i = a, #ARGV do redis.call('SREM', KEYS[1], ARGV[i]) end
return {}
