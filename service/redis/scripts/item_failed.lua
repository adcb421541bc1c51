-- Records a failed line for an item still queued in that chunk. KEYS: items, counts, errors,
-- chunk hash, total images. ARGV: index, chunk, error JSON, action (retry|fail|cancel|requeue:
-- back to pending without counting an attempt, for a line we stopped ourselves),
-- max attempts, images label field ("model|failed"), images on failure.
-- Returns the item's new status letter, or '' when the line was stale.
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return '' end
local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
if st ~= 'q' or ch ~= ARGV[2] then return '' end
att = tonumber(att)
if ARGV[4] ~= 'requeue' then att = att + 1 end
local new = 'f'
if ARGV[4] == 'requeue' then new = 'p'
elseif ARGV[4] == 'retry' and att < tonumber(ARGV[5]) then new = 'p'
elseif ARGV[4] == 'cancel' then new = 'x' end
local names = {p='pending', f='failed', x='cancelled'}
redis.call('HSET', KEYS[1], ARGV[1], new .. '|' .. att .. '|' .. ch .. '|' .. id)
redis.call('HINCRBY', KEYS[2], 'queued', -1)
redis.call('HINCRBY', KEYS[2], names[new], 1)
redis.call('HINCRBY', KEYS[4], 'open', -1)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if new == 'f' then redis.call('HINCRBY', KEYS[5], ARGV[6], tonumber(ARGV[7])) end
return new
