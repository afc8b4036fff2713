-- ARGV[3] = id, ARGV[4] = ttl ms. Publishes nothing (unless it reaps).
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
if not alive(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[3])
redis.call('PEXPIRE', ARGV[1] .. ARGV[3], ttl + GRACE)
return 1
