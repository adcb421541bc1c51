-- KEYS held, total, effective, waiter.  ARGV key, tokens, configured limit, waiter ttl ms.
-- Returns 1 held (now or already), 0 refused.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
local tokens = tonumber(ARGV[2])
local configured = tonumber(ARGV[3])
local limit = configured
local eff = redis.call('GET', KEYS[3])
if eff then
  eff = tonumber(eff)
  if configured == 0 or eff < configured then limit = eff end
end
if limit > 0 then
  local total = tonumber(redis.call('GET', KEYS[2]) or '0')
  local waiter = redis.call('GET', KEYS[4])
  local room_for_waiter = 0
  local waiter_is_me = false
  if waiter then
    local sep = string.find(waiter, '|', 1, true)
    local wtokens = tonumber(string.sub(waiter, 1, sep - 1))
    if string.sub(waiter, sep + 1) == ARGV[1] then
      waiter_is_me = true
    else
      room_for_waiter = math.min(wtokens, limit)
    end
  end
  local fits = total + tokens + room_for_waiter <= limit
  -- Nothing held and nobody else waiting: grant even a chunk larger than the whole limit.
  if total == 0 and room_for_waiter == 0 then fits = true end
  if tokens == 0 then fits = true end
  if not fits then
    if not waiter then
      redis.call('SET', KEYS[4], ARGV[2] .. '|' .. ARGV[1], 'PX', ARGV[4])
    elseif waiter_is_me then
      redis.call('PEXPIRE', KEYS[4], ARGV[4])
    end
    return 0
  end
  if waiter_is_me then redis.call('DEL', KEYS[4]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], ARGV[2])
return 1
