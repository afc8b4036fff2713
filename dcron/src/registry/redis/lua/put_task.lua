-- KEYS[1] = tasks; ARGV[1] = channel, ARGV[2] = name, ARGV[3] = JSON,
-- ARGV[4] = `1` to overwrite. Returns 0 if it exists (create-only).
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
elseif redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[1], 'task-put ' .. ARGV[2])
return 1
