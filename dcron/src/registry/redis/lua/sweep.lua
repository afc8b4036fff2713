-- Reaps; returns ms until the next member expires, or -1 if none.
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return -1 end
local left = tonumber(first[2]) - now
if left < 0 then return 0 end
return left
