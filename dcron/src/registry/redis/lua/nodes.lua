-- Returns `[id1, record1, id2, record2, ...]` of the live members (a
-- missing record is nil).
local now = now_ms()
reap(KEYS[1], ARGV[1], ARGV[2], now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.0f', now), '+inf')
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('GET', ARGV[1] .. id)
end
return out
