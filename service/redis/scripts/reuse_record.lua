-- Records entries in a tenant's reuse index and keeps it bounded. KEYS: entries (HASH
-- fingerprint -> entry JSON), used (ZSET fingerprint -> last recorded, ms). ARGV: now (ms), the
-- oldest "last recorded" kept (ms), the most entries kept, the keys' TTL (ms), then
-- fingerprint / entry pairs. Entries not recorded since the cutoff go (at most 1,000 a call),
-- then the least recently recorded beyond the cap (at most 10,000 a call), so one call never
-- holds Redis for long. Returns how many entries were dropped.
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[i])
end
local dropped = 0
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2], 'LIMIT', 0, 1000)
for _, fp in ipairs(old) do
  redis.call('HDEL', KEYS[1], fp)
  redis.call('ZREM', KEYS[2], fp)
  dropped = dropped + 1
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], math.min(over, 10000))
  for i = 1, #popped, 2 do
    redis.call('HDEL', KEYS[1], popped[i])
    dropped = dropped + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return dropped
