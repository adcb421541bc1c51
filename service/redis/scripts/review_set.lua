-- Records review decisions and keeps the per-decision counts exact, however often it runs.
-- KEYS: review hash (index -> "a|json" or "r|json"), counts hash (approved, rejected).
-- ARGV: pairs "index value"; a value of "" clears the item's decision.
-- Returns how many items changed decision.
local names = {a='approved', r='rejected'}
local changed = 0
for i = 1, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  local before = old and string.sub(old, 1, 1) or ''
  local after = string.sub(ARGV[i + 1], 1, 1)
  if before ~= after then
    changed = changed + 1
    if names[before] then redis.call('HINCRBY', KEYS[2], names[before], -1) end
    if names[after] then redis.call('HINCRBY', KEYS[2], names[after], 1) end
  end
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return changed
