-- ARGV[3] = id, ARGV[4] = record JSON, ARGV[5] = ttl ms.
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
local ttl = tonumber(ARGV[5])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('SET', ARGV[1] .. ARGV[3], ARGV[4], 'PX', ttl + GRACE)
redis.call('PUBLISH', ARGV[2], 'node-put ' .. ARGV[3])
return 1
