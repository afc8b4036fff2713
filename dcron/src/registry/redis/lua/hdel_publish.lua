-- KEYS[1] = hash; ARGV[1] = channel, ARGV[2] = field, ARGV[3] = message
-- kind. Publishes only when the field existed.
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
if removed == 1 then redis.call('PUBLISH', ARGV[1], ARGV[3] .. ' ' .. ARGV[2]) end
return removed
