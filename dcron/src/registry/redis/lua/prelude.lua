-- Shared by every node script. KEYS[1] = `{ns}:nodes`, ARGV[1] = the record
-- key prefix `{ns}:node:`, ARGV[2] = the events channel; record keys are
-- built here (same hash tag, so the same cluster slot).

-- The server's clock, epoch ms: the only clock liveness is measured by.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Removes the members expired before `now`, deletes their records and
-- publishes one `node-delete` each (atomically: each expiry once).
local function reap(zkey, prefix, channel, now)
  local gone = redis.call('ZRANGEBYSCORE', zkey, '-inf', '(' .. string.format('%.0f', now), 'LIMIT', 0, 1000)
  for _, id in ipairs(gone) do
    redis.call('ZREM', zkey, id)
    redis.call('DEL', prefix .. id)
    redis.call('PUBLISH', channel, 'node-delete ' .. id)
  end
  return #gone
end
