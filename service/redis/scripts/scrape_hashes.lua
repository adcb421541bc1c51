-- Whole hashes as one JSON array of [field, value, ...] lists. KEYS: the hashes.
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return cjson.encode(out)
