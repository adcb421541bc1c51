-- KEYS state, held, settled.  ARGV key, actual, ttl s.  Returns 1 settled now, 0 already settled.
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
