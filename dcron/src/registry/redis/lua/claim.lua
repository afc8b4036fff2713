-- KEYS[1] = claims; ARGV[1] = fire time, ARGV[2] = claim JSON, ARGV[3] =
-- claim token, ARGV[4..] = task names. Returns one 0/1 per task: 1 if the
-- claim was stored, or is already stored (same fire time and non-empty
-- token: a retry after a lost answer, nothing written); 0 if the stored
-- watermark is as new or newer. A stored value that is not a claim (as
-- dcron would decode it) counts as absent.
local function int(v)
  return type(v) == 'number' and v == math.floor(v) and v > -9.2e18 and v < 9.2e18
end
local ft = tonumber(ARGV[1])
local token = ARGV[3]
local out = {}
for i = 4, #ARGV do
  local won, write = 1, true
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local ok, c = pcall(cjson.decode, cur)
    if ok and type(c) == 'table' and int(c.fire_time) and int(c.claimed_at)
        and type(c.node) == 'string'
        and (c.token == nil or type(c.token) == 'string') then
      if token ~= '' and c.fire_time == ft and c.token == token then
        write = false
      elseif c.fire_time >= ft then
        won, write = 0, false
      end
    end
  end
  if write then redis.call('HSET', KEYS[1], ARGV[i], ARGV[2]) end
  out[#out + 1] = won
end
return out
