-- KEYS[1] = hash; ARGV[1] = channel, ARGV[2] = field, ARGV[3] = value,
-- ARGV[4] = message kind. Publishes only when the field is new.
local added = redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if added == 1 then redis.call('PUBLISH', ARGV[1], ARGV[4] .. ' ' .. ARGV[2]) end
return added
