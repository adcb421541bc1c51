-- Adds what a duplicate upstream batch billed to its job and the totals, exactly once.
-- KEYS job duplicates hash, job spend, total tokens, total cost, the tenant's spend of the day,
-- the duplicates set the sweep watches.
-- ARGV batch id, record JSON, seconds the day's spend is kept, set member, then
-- "target field amount" triples (1=spend, 2=total tokens, 3=total cost, 4=the day's spend).
-- Returns 1 when accounted now, 0 when it had been before.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[4])
if cur and cur ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local daily = false
for i = 5, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[1 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  if ARGV[i] == '4' then daily = true end
end
if daily then redis.call('EXPIRE', KEYS[5], ARGV[3]) end
return 1
