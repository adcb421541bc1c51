-- Moves items still queued in one chunk into another (a batch chunk's items to the sync lane's
-- chunk 0). KEYS: items, the target chunk's items list, the target chunk hash, the source chunk
-- hash. ARGV: source chunk number, target chunk number, then item indexes. Items not queued in
-- the source chunk (already moved, recorded, or never there) are skipped, so running it twice
-- moves each item once. Returns the indexes moved.
local moved = {}
for i = 3, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
    if st == 'q' and ch == ARGV[1] then
      redis.call('HSET', KEYS[1], ARGV[i], 'q|' .. att .. '|' .. ARGV[2] .. '|' .. id)
      redis.call('RPUSH', KEYS[2], ARGV[i])
      moved[#moved + 1] = ARGV[i]
    end
  end
end
if #moved > 0 then
  redis.call('HINCRBY', KEYS[3], 'lines', #moved)
  redis.call('HINCRBY', KEYS[3], 'open', #moved)
  redis.call('HINCRBY', KEYS[4], 'open', -#moved)
end
return moved
