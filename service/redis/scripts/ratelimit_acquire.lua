-- KEYS limiter, its calls in flight.  ARGV now, rpm, ipm, tpm, burst µs, headroom, idle expiry s,
-- in-flight limit µs, images, tokens.
-- Granted: {'0', now µs, sum_r, sum_i, sum_t} (the sums after this grant: the grant's mark, which
-- ratelimit_observe uses to tell what was sent after it). Refused: {'wait', seconds}; nothing
-- is charged.
--! include clock(ARGV[1])
--! include ratelimit_bucket()
forget_stale()
local costs = {1, tonumber(ARGV[9]), tonumber(ARGV[10])}
local wait = 0
local hold = num(state['hold']) or 0
if hold > now then wait = hold - now end
local buckets = {}
for k, d in ipairs(DIMS) do
  local b = bucket(d, k)
  buckets[k] = b
  if b and costs[k] > 0 then
    -- A call costing more than the whole bucket goes when the bucket is full.
    local need = math.min(costs[k] + b.margin, b.cap)
    if b.level < need then
      local w = (need - b.level) / b.rate * 1000000
      if w > wait then wait = w end
    end
  end
end
if wait > 0 then return {'wait', string.format('%.6f', wait / 1000000)} end
local updates = {'at', string.format('%.0f', now)}
local sums = {}
for k, d in ipairs(DIMS) do
  if buckets[k] then
    updates[#updates + 1] = 'lvl_' .. d
    updates[#updates + 1] = string.format('%.6f', buckets[k].level - costs[k])
  end
  sums[k] = string.format('%.0f', (num(state['sum_' .. d]) or 0) + costs[k])
  updates[#updates + 1] = 'sum_' .. d
  updates[#updates + 1] = sums[k]
  updates[#updates + 1] = 'out_' .. d
  updates[#updates + 1] = string.format('%.0f', (num(state['out_' .. d]) or 0) + costs[k])
end
redis.call('HSET', KEYS[1], unpack(updates))
redis.call('ZADD', KEYS[2], string.format('%.0f', now),
           sums[1] .. ':' .. ARGV[9] .. ':' .. ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {'0', string.format('%.0f', now), sums[1], sums[2], sums[3]}
