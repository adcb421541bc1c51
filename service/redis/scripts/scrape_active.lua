-- Jobs by status and their items by state, summed inside Redis. ARGV: job key prefix, counts
-- key suffix, then job ids. Returns JSON [{status: jobs}, {state: items}].
local jobs, items = {}, {}
for i = 3, #ARGV do
  local st = redis.call('HGET', ARGV[1] .. ARGV[i], 'status') or 'unknown'
  jobs[st] = (jobs[st] or 0) + 1
  local c = redis.call('HGETALL', ARGV[1] .. ARGV[i] .. ARGV[2])
  for f = 1, #c, 2 do items[c[f]] = (items[c[f]] or 0) + tonumber(c[f + 1]) end
end
return cjson.encode({jobs, items})
