-- The connectors operators see (GET /v1/admin/connectors, the dashboard, /metrics) are the
-- configured ones: a starting connect process makes the list its connector files, so a removed
-- or renamed file's connector is no longer shown. Its cursor, state and closed hash stay: a
-- connector added back under the same name resumes from its cursor.
-- KEYS[1] the set of listed connector names (keys.CONNECTORS_KEY)
-- ARGV the names of the connector files of the starting process
-- Returns the number of names no longer listed
local listed = KEYS[1]
local keep = {}
for i = 1, #ARGV do
  keep[ARGV[i]] = true
end
local gone = 0
for _, name in ipairs(redis.call('SMEMBERS', listed)) do
  if not keep[name] then
    redis.call('SREM', listed, name)
    gone = gone + 1
  end
end
if #ARGV > 0 then
  redis.call('SADD', listed, unpack(ARGV))
end
return gone
