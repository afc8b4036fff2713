-- KEYS = tasks, deleted, claims; ARGV[1] = channel. Publishes one delete
-- per name, or a single `resync` when there are more than 1000.
local n = redis.call('HLEN', KEYS[1]) + redis.call('HLEN', KEYS[2])
if n > 1000 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('PUBLISH', ARGV[1], 'resync')
  return n
end
local tasks = redis.call('HKEYS', KEYS[1])
local dead = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
for _, name in ipairs(tasks) do redis.call('PUBLISH', ARGV[1], 'task-delete ' .. name) end
for _, name in ipairs(dead) do redis.call('PUBLISH', ARGV[1], 'tombstone-delete ' .. name) end
return n
