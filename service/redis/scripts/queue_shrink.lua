-- KEYS held, total, effective, waiter.  ARGV failed key, configured limit, floor fraction,
-- recovery ms.  Returns the new effective limit, or -1 if the key was not held (already handled).
local failed = redis.call('HGET', KEYS[1], ARGV[1])
if not failed then return -1 end
failed = tonumber(failed)
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
local configured = tonumber(ARGV[2])
-- Upstream accepted everything we hold except the failed chunk: that is the limit we know works.
local new = total - failed
local floor = 1
if configured > 0 then floor = math.max(1, math.floor(configured * tonumber(ARGV[3]))) end
if new < floor then new = floor end
local current = redis.call('GET', KEYS[3])
if current then current = tonumber(current) else current = configured end
if current > 0 and new > current then new = current end
redis.call('SET', KEYS[3], string.format('%.0f', new), 'PX', ARGV[4])
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('DECRBY', KEYS[2], string.format('%.0f', failed)) <= 0 then
  redis.call('DEL', KEYS[2])
end
return new
