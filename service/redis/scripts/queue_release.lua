-- KEYS held, total, effective, waiter.  ARGV key, configured limit.  Returns 1 released, 0 not held.
local waiter = redis.call('GET', KEYS[4])
if waiter then
  local sep = string.find(waiter, '|', 1, true)
  if string.sub(waiter, sep + 1) == ARGV[1] then redis.call('DEL', KEYS[4]) end
end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('DECRBY', KEYS[2], held) <= 0 then redis.call('DEL', KEYS[2]) end
local eff = redis.call('GET', KEYS[3])
if eff then
  eff = tonumber(eff)
  local configured = tonumber(ARGV[2])
  local base = configured
  if base == 0 then base = eff end
  -- A batch ended and freed upstream's queue: probe upward by half of what it held.
  local step = math.max(math.floor(tonumber(held) / 2), math.ceil(base / 100), 1)
  local grown = eff + step
  if configured > 0 and grown >= configured then
    redis.call('DEL', KEYS[3])
  else
    redis.call('SET', KEYS[3], string.format('%.0f', grown), 'KEEPTTL')
  end
end
return 1
