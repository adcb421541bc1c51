-- Records items completed by reuse (a copy of an image the tenant had), each exactly once, the
-- way item_succeeded.lua records a generated one: the usage record is written with HSETNX (the
-- guard), the item moves to succeeded from whatever it was, and the job's spend hash counts its
-- images and one "reused"; no tokens, no cost. KEYS: items, counts, usage, spend, total images.
-- ARGV: chunk key prefix, total-images field ("model|reused"), then triples of item index,
-- usage JSON, images. Returns the indexes counted now (the others had been counted before).
local names = {p='pending', q='queued', s='succeeded', f='failed', x='cancelled'}
local counted = {}
for i = 3, #ARGV, 3 do
  local index, images = ARGV[i], tonumber(ARGV[i + 2])
  if redis.call('HSETNX', KEYS[3], index, ARGV[i + 1]) == 1 then
    local v = redis.call('HGET', KEYS[1], index)
    if v then
      local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
      if st ~= 's' then
        redis.call('HINCRBY', KEYS[2], names[st], -1)
        redis.call('HINCRBY', KEYS[2], 'succeeded', 1)
        if st == 'q' then redis.call('HINCRBY', ARGV[1] .. ch, 'open', -1) end
      end
      redis.call('HSET', KEYS[1], index, 's|' .. att .. '|' .. ch .. '|' .. id)
    end
    redis.call('HINCRBY', KEYS[4], 'images', images)
    redis.call('HINCRBY', KEYS[4], 'reused', 1)
    redis.call('HINCRBY', KEYS[5], ARGV[2], images)
    counted[#counted + 1] = index
  end
end
return counted
