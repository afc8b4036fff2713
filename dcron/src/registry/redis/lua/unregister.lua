-- ARGV[3] = id.
local removed = redis.call('ZREM', KEYS[1], ARGV[3])
redis.call('DEL', ARGV[1] .. ARGV[3])
if removed == 1 then redis.call('PUBLISH', ARGV[2], 'node-delete ' .. ARGV[3]) end
return removed
