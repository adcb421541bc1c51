-- Upstream batches by upstream status. ARGV: job key prefix, chunk key infix, then
-- "job_id:chunk" members of ACTIVE_CHUNKS. Returns JSON {status: batches}.
local by = {}
for i = 3, #ARGV do
  local _, _, job, n = string.find(ARGV[i], '^(.*):([^:]*)$')
  local st = job and redis.call('HGET', ARGV[1] .. job .. ARGV[2] .. n, 'upstream_status')
  st = st or 'unknown'
  by[st] = (by[st] or 0) + 1
end
return cjson.encode(by)
