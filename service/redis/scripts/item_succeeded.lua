-- Records a successful item exactly once. KEYS: items, counts, usage, spend, total tokens,
-- total cost, total images, the tenant's spend of the day. ARGV: index, usage JSON, chunk key
-- prefix, seconds the day's spend is kept, then tokens/cost field list as alternating
-- "hash-index field amount" triples (1=spend, 2=total tokens, 3=total cost, 4=total images,
-- 5=the day's spend). Returns 1 when counted now, 0 when it had been counted before.
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return 0 end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
  local names = {p='pending', q='queued', s='succeeded', f='failed', x='cancelled'}
  if st ~= 's' then
    redis.call('HINCRBY', KEYS[2], names[st], -1)
    redis.call('HINCRBY', KEYS[2], 'succeeded', 1)
    if st == 'q' then redis.call('HINCRBY', ARGV[3] .. ch, 'open', -1) end
  end
  redis.call('HSET', KEYS[1], ARGV[1], 's|' .. att .. '|' .. ch .. '|' .. id)
end
local daily = false
for i = 5, #ARGV, 3 do
  local k = KEYS[3 + tonumber(ARGV[i])]
  redis.call('HINCRBY', k, ARGV[i + 1], ARGV[i + 2])
  if ARGV[i] == '5' then daily = true end
end
if daily then redis.call('EXPIRE', KEYS[8], ARGV[4]) end
return 1
