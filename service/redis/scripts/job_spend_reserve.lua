-- KEYS state, held, settled.  ARGV key, estimate, cap ('' = none), ttl s.  Returns 1 held, 0 refused.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 1
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'cap', ARGV[3])
  local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
  local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
  if reserved + spent + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
