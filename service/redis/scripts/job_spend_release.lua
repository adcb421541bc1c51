-- KEYS state, held.  ARGV key.  Returns 1 released, 0 not held.
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
return 1
