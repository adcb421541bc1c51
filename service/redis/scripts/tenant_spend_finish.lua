-- KEYS held, reserved-day, reserved-month [, settled marker, day now, month now].
-- ARGV key, expected record ('' = none) [, actual, day expireat, month expireat, marker ttl].
-- Settle when the extra keys/args are given, else release.
-- Returns 1 done, 0 nothing to do (already settled / not held), -1 the record changed: read again.
if #KEYS > 3 and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local record = redis.call('HGET', KEYS[1], ARGV[1])
if (record or '') ~= ARGV[2] then return -1 end
if record then
  local amount = string.sub(record, 1, string.find(record, '|', 1, true) - 1)
  redis.call('HDEL', KEYS[1], ARGV[1])
  -- The reservation's own day and month may have expired already; never recreate them.
  for i = 2, 3 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. amount)
    end
  end
elseif #KEYS == 3 then
  return 0
end
if #KEYS > 3 then
  redis.call('HINCRBY', KEYS[5], 'spent', ARGV[3])
  redis.call('EXPIREAT', KEYS[5], ARGV[4])
  redis.call('HINCRBY', KEYS[6], 'spent', ARGV[3])
  redis.call('EXPIREAT', KEYS[6], ARGV[5])
  redis.call('SET', KEYS[4], '1', 'EX', ARGV[6])
end
return 1
