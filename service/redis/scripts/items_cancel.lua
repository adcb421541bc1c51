-- Cancels items that have not reached upstream. KEYS: items, counts, chunk key prefix is ARGV[1].
-- ARGV: prefix, then indexes. Pending items, and queued items whose chunk is in the set of
-- not-submitted chunks passed as "c:<n>" entries, become cancelled.
local open = {}
local idx = {}
for i = 2, #ARGV do
  if string.sub(ARGV[i], 1, 2) == 'c:' then open[string.sub(ARGV[i], 3)] = true
  else idx[#idx + 1] = ARGV[i] end
end
local n = 0
for _, i in ipairs(idx) do
  local v = redis.call('HGET', KEYS[1], i)
  if v then
    local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
    if st == 'p' or (st == 'q' and open[ch]) then
      redis.call('HSET', KEYS[1], i, 'x|' .. att .. '|' .. ch .. '|' .. id)
      if st == 'p' then redis.call('HINCRBY', KEYS[2], 'pending', -1)
      else
        redis.call('HINCRBY', KEYS[2], 'queued', -1)
        redis.call('HINCRBY', ARGV[1] .. ch, 'open', -1)
      end
      redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
      n = n + 1
    end
  end
end
return n
