-- Worker heartbeats, dropping those older than the cutoff: a worker that stopped for good
-- would otherwise stay on the dashboard forever. Atomic, so a worker beating at the same moment
-- is never dropped. KEYS: HEARTBEATS. ARGV: cutoff. Returns JSON [worker, time, ...].
local out = {}
local rows = redis.call('HGETALL', KEYS[1])
for i = 1, #rows, 2 do
  if tonumber(rows[i + 1]) < tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], rows[i])
  else out[#out + 1] = rows[i]; out[#out + 1] = rows[i + 1] end
end
return cjson.encode(out)
