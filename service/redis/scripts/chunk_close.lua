-- Closes a chunk plan has finished filling: assembling -> planned, and onto the sweep's waiting
-- set in the same step, so no crash can leave a planned chunk that nothing will submit.
-- KEYS chunk hash, waiting zset.  ARGV ref ("job:n"), now (unix seconds).
-- Returns 1 when the chunk is now waiting to be submitted, 0 when it had moved on already.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'assembling' then
  redis.call('HSET', KEYS[1], 'status', 'planned')
  status = 'planned'
end
if status == 'planned' or status == 'waiting' then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
  return 1
end
return 0
