-- Moves pending items into a chunk. KEYS: items, counts, chunk items list, chunk hash.
-- ARGV: chunk number, then item indexes. Items no longer pending are skipped.
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, 1, 1) == 'p' then
    local _, _, att, id = string.find(v, '^p|(%d+)|%-?%d+|(.*)$')
    redis.call('HSET', KEYS[1], ARGV[i], 'q|' .. att .. '|' .. ARGV[1] .. '|' .. id)
    redis.call('RPUSH', KEYS[3], ARGV[i])
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'pending', -n)
  redis.call('HINCRBY', KEYS[2], 'queued', n)
  redis.call('HINCRBY', KEYS[4], 'lines', n)
  redis.call('HINCRBY', KEYS[4], 'open', n)
end
return n
