-- Shared check of heartbeat and update: the member is alive and has a
-- record (a member without one is removed and its delete published).
local function alive(zkey, prefix, channel, id)
  if not redis.call('ZSCORE', zkey, id) then return false end
  if redis.call('EXISTS', prefix .. id) == 0 then
    redis.call('ZREM', zkey, id)
    redis.call('PUBLISH', channel, 'node-delete ' .. id)
    return false
  end
  return true
end
