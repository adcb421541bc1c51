-- KEYS limiter.  ARGV now, hold µs from now, idle expiry s.  Nobody in the cluster is granted
-- anything before the hold ends (a longer hold is never shortened). Returns the hold's end (µs).
--! include clock(ARGV[1])
local until_ = now + tonumber(ARGV[2])
local hold = tonumber(redis.call('HGET', KEYS[1], 'hold') or '0')
if until_ > hold then redis.call('HSET', KEYS[1], 'hold', string.format('%.0f', until_)) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], 'hold') or '0'
