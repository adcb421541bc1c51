-- KEYS held, settled marker, day, month.  ARGV key, amount, day cap, month cap ('' = none),
-- record, day expireat, month expireat, held ttl.  Returns 1 held, 0 refused.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 1
end
local amount = tonumber(ARGV[2])
for i, cap in ipairs({ARGV[3], ARGV[4]}) do
  if cap ~= '' then
    local reserved = tonumber(redis.call('HGET', KEYS[2 + i], 'reserved') or '0')
    local spent = tonumber(redis.call('HGET', KEYS[2 + i], 'spent') or '0')
    if reserved + spent + amount > tonumber(cap) then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('HINCRBY', KEYS[3], 'reserved', ARGV[2])
redis.call('EXPIREAT', KEYS[3], ARGV[6])
redis.call('HINCRBY', KEYS[4], 'reserved', ARGV[2])
redis.call('EXPIREAT', KEYS[4], ARGV[7])
return 1
