-- KEYS limiter.  ARGV now, rpm, ipm, tpm, images, tokens, burst µs.
-- Returns '0' when granted (and charged), else the seconds to wait (nothing charged).
--! include clock(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'tat_r', 'tat_i', 'tat_t', 'hold',
                     'lim_r', 'lim_r_until', 'lim_t', 'lim_t_until')
local function effective(configured, learned, valid_until)
  if learned and valid_until and tonumber(valid_until) > now then
    learned = tonumber(learned)
    if configured == 0 or learned < configured then return learned end
  end
  return configured
end
local limits = {effective(tonumber(ARGV[2]), h[5], h[6]), tonumber(ARGV[3]),
                effective(tonumber(ARGV[4]), h[7], h[8])}
local costs = {1, tonumber(ARGV[5]), tonumber(ARGV[6])}
local fields = {'tat_r', 'tat_i', 'tat_t'}
local burst = tonumber(ARGV[7])
local wait = 0
local hold = tonumber(h[4] or '0')
if hold > now then wait = hold - now end
local updates = {}
for i = 1, 3 do
  if limits[i] > 0 and costs[i] > 0 then
    local increment = 60000000 / limits[i] * costs[i]
    local tat = tonumber(h[i] or '0')
    if tat < now then tat = now end
    local new_tat = tat + increment
    -- Allowed once the schedule is no further ahead of now than the burst allowance; a call
    -- costing more than the whole allowance goes when the dimension is idle.
    local allow_at = new_tat - math.max(burst, increment)
    if allow_at > now and allow_at - now > wait then wait = allow_at - now end
    updates[#updates + 1] = fields[i]
    updates[#updates + 1] = string.format('%.0f', new_tat)
  end
end
if wait > 0 then return string.format('%.6f', wait / 1000000) end
if #updates > 0 then
  redis.call('HSET', KEYS[1], unpack(updates))
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
return '0'
