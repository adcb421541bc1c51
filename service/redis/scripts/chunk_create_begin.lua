-- A batch create for the chunk is about to be sent: records when, only by the holder of the
-- chunk's submit lease and only while the chunk has no batch.
-- KEYS submit lease, chunk hash.  ARGV lease token, now (unix seconds).
-- Returns 1 recorded, 0 the lease is not ours (nothing written), -1 the chunk has a batch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local b = redis.call('HGET', KEYS[2], 'batch_id')
if b and b ~= '' then return -1 end
redis.call('HSET', KEYS[2], 'create_started', ARGV[2])
return 1
