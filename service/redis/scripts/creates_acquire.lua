-- KEYS window zset, sequence.  ARGV per-window limit, window µs, now µs ('' = server time).
-- Returns '0' when taken, else the seconds until the oldest creation leaves the window.
--! include clock(ARGV[3])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  local seq = redis.call('INCR', KEYS[2])
  local stamp = string.format('%.0f', now)
  redis.call('ZADD', KEYS[1], stamp, stamp .. '-' .. seq)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return string.format('%.6f', (tonumber(oldest[2]) + window - now) / 1000000)
