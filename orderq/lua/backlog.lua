-- The backlog and depths of one partition in one call: the breaker samples them ten times a
-- second and the bench every 25 ms while a burst drains; read as seven commands, each sample
-- cost its caller seven commands' worth of Python, per partition.
-- KEYS[1] intake stream, KEYS[2..4] ready lanes vip/new/regular, KEYS[5] review zset,
-- KEYS[6] deferred stream, KEYS[7] held zset
-- Returns {intake, vip, new, regular, review, deferred, held}: their lengths
return {redis.call('XLEN', KEYS[1]), redis.call('XLEN', KEYS[2]), redis.call('XLEN', KEYS[3]),
        redis.call('XLEN', KEYS[4]), redis.call('ZCARD', KEYS[5]), redis.call('XLEN', KEYS[6]),
        redis.call('ZCARD', KEYS[7])}
