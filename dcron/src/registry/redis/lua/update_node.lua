-- ARGV[3] = id, ARGV[4] = record JSON.
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
if not alive(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('SET', ARGV[1] .. ARGV[3], ARGV[4], 'KEEPTTL')
redis.call('PUBLISH', ARGV[2], 'node-put ' .. ARGV[3])
return 1
