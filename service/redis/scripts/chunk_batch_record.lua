-- Records the chunk's upstream batch: a compare-and-set on the submit lease's token and on the
-- chunk having no other batch, so a submitter that lost its lease never writes batch_id.
-- KEYS submit lease, chunk hash, the batch's index key (batch id -> chunk).
-- ARGV lease token, batch id, "job_id:number", seconds the index is kept.
-- Returns 'ok' when this is the chunk's batch now (or already was), 'lease' when the lease is not
-- ours (nothing written), else the id of the other batch recorded before (nothing written).
local cur = redis.call('HGET', KEYS[2], 'batch_id')
if cur == ARGV[2] then return 'ok' end
if cur and cur ~= '' then return cur end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'lease' end
redis.call('HSET', KEYS[2], 'batch_id', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 'ok'
