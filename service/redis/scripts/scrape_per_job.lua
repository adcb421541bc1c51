-- What the per-job series need. ARGV: job key prefix, spend key suffix, number of spend fields,
-- the spend fields, then job ids. Returns JSON [job_id, tenant, model, spend..., job_id, ...]
-- with false for a missing field.
local nf = tonumber(ARGV[3])
local fields = {}
for i = 1, nf do fields[i] = ARGV[3 + i] end
local out = {}
for i = 4 + nf, #ARGV do
  local id = ARGV[i]
  local job = redis.call('HMGET', ARGV[1] .. id, 'tenant', 'model')
  out[#out + 1] = id
  out[#out + 1] = job[1]
  out[#out + 1] = job[2]
  local spend = redis.call('HMGET', ARGV[1] .. id .. ARGV[2], unpack(fields))
  for f = 1, nf do out[#out + 1] = spend[f] end
end
return cjson.encode(out)
