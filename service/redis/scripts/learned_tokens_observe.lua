-- Folds one observation into a decaying average. KEYS: the model's learned-tokens hash.
-- ARGV: field ("size|quality"), observed tokens per image, the least weight a new observation
-- gets, the hash's expiry in seconds. The first 1/weight observations make a plain mean; after
-- that each new one weighs `weight`, so the average follows upstream when its counts change.
-- Stored as "average|samples". Returns the new average as a string.
local v = redis.call('HGET', KEYS[1], ARGV[1])
local avg, n = 0, 0
if v then
  local _, _, a, c = string.find(v, '^([^|]+)|(%d+)$')
  if a then avg = tonumber(a) or 0; n = tonumber(c) or 0 end
end
n = n + 1
local w = math.max(1 / n, tonumber(ARGV[3]))
avg = avg + w * (tonumber(ARGV[2]) - avg)
local text = string.format('%.3f', avg)
redis.call('HSET', KEYS[1], ARGV[1], text .. '|' .. n)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return text
