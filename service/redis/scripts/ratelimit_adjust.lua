-- KEYS limiter.  ARGV now, hold µs from now ('' = none), learned rpm, learned tpm ('' = none),
-- learned ttl µs, idle expiry s.  Returns the hold's end (µs) as a string.
--! include clock(ARGV[1])
if ARGV[2] ~= '' then
  local until_ = now + tonumber(ARGV[2])
  local hold = tonumber(redis.call('HGET', KEYS[1], 'hold') or '0')
  if until_ > hold then redis.call('HSET', KEYS[1], 'hold', string.format('%.0f', until_)) end
end
local valid_until = string.format('%.0f', now + tonumber(ARGV[5]))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'lim_r', ARGV[3], 'lim_r_until', valid_until) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'lim_t', ARGV[4], 'lim_t_until', valid_until) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
return redis.call('HGET', KEYS[1], 'hold') or '0'
