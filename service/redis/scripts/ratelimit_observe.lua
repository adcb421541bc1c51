-- KEYS limiter, its calls in flight.  ARGV now, rpm, ipm, tpm, burst µs, headroom, idle expiry s,
-- in-flight limit µs, learned ttl µs, the grant's time µs, its requests mark, images and tokens
-- ('' = no grant: the answer is taken as describing upstream just now), then per dimension r, i,
-- t: upstream's limit, remaining, reset µs ('' = header absent).
-- The answered call is no longer in flight. Each dimension upstream spoke of is set to what
-- upstream says is left, less everything of ours still in flight (granted, not yet answered: it
-- may not have reached upstream when it counted); upstream's limit is the
-- bucket's size, and limit - remaining over reset its refill rate. Between two answers with
-- nothing else in flight, a bucket lower than our spending explains is another client's use.
-- Returns the levels.
--! include clock(ARGV[1])
--! include ratelimit_bucket()
forget_stale()
local ttl = tonumber(ARGV[9])
local granted_at = num(ARGV[10]) or now
-- Answers are ordered by their grant's requests mark (grants in one microsecond still differ);
-- an answer without a grant is the newest.
local order = num(ARGV[11]) or math.huge
local costs = {1, num(ARGV[12]) or 0, num(ARGV[13]) or 0}
local updates = {'at', string.format('%.0f', now)}
local function put(field, value) updates[#updates + 1] = field; updates[#updates + 1] = value end
local outstanding = {}
if ARGV[11] ~= '' then
  local removed = redis.call('ZREM', KEYS[2], ARGV[11] .. ':' .. ARGV[12] .. ':' .. ARGV[13])
  for k, d in ipairs(DIMS) do
    local out = num(state['out_' .. d]) or 0
    if removed == 1 then out = math.max(0, out - costs[k]) end
    outstanding[k] = out
    put('out_' .. d, string.format('%.0f', out))
  end
else
  for k, d in ipairs(DIMS) do outstanding[k] = num(state['out_' .. d]) or 0 end
end
local clean = outstanding[1] == 0
local levels = {}
for k, d in ipairs(DIMS) do
  local b = bucket(d, k)
  if b then levels[k] = b.level end
end
for k, d in ipairs(DIMS) do
  local base = 14 + (k - 1) * 3
  local remaining = num(ARGV[base + 1])
  local limit = num(ARGV[base]) or math.max(remaining or 0, num(state['cap_' .. d]) or 0)
  -- A huge limit is how an unlimited dimension is reported: nothing to learn.
  if remaining and limit > 0 and limit < 1e9 then
    local reset = num(ARGV[base + 2])
    local spent = limit - remaining
    local rate = num(state['rate_' .. d])
    -- remaining is rounded down and reset counts to full: read the rate when enough is spent
    -- that the rounding hardly matters.
    if reset and reset > 0 and spent >= math.max(2, limit / 2) then
      rate = (spent - 0.5) / (reset / 1000000)
    end
    rate = rate or gross_rate(d, k, limit)
    local others = num(state['f_' .. d]) or 0
    local seen = num(state['seen_' .. d])
    local newest = not seen or order > (num(state['seen_q_' .. d]) or -1) or ARGV[11] == ''
    local anchor = num(state['anc_t_' .. d])
    if newest and clean and anchor and granted_at > anchor then
      -- Nothing of ours was in flight at this answer nor at the last such one (the anchor), so
      -- both are exactly upstream's view of our spending; with refill that could not overflow
      -- in between, any shortfall is others' use, smoothed over about ten seconds.
      local dt = (granted_at - anchor) / 1000000
      local prev = num(state['anc_r_' .. d])
      if prev + rate * dt <= limit then
        local ours_between = (num(state['sum_' .. d]) or 0) - num(state['anc_s_' .. d])
        local shortfall = prev + rate * dt - ours_between - remaining
        others = others + math.min(1, dt / 10) * (shortfall / dt - others)
        others = math.max(0, math.min(rate * 0.9, others))
      end
    end
    -- No credit for the refill since upstream counted: when it counted (between the grant and
    -- now) is unknown, and a loaded worker can take long to send. The level lags upstream's by
    -- one answer's time, which only leaves that much more of the bucket unspent.
    local truth = math.min(limit, remaining) - outstanding[k]
    if newest then
      levels[k] = truth
      put('seen_' .. d, string.format('%.0f', granted_at))
      put('seen_q_' .. d, string.format('%.0f', num(ARGV[11]) or num(state['sum_r']) or 0))
      if clean then
        put('anc_t_' .. d, string.format('%.0f', granted_at))
        put('anc_r_' .. d, tostring(remaining))
        put('anc_s_' .. d, string.format('%.0f', num(state['sum_' .. d]) or 0))
      end
    elseif levels[k] == nil or truth < levels[k] then
      levels[k] = truth  -- an older answer: it may only lower the level
    end
    put('cap_' .. d, tostring(limit))
    put('rate_' .. d, string.format('%.6f', rate))
    put('f_' .. d, string.format('%.6f', others))
    put('until_' .. d, string.format('%.0f', now + ttl))
  end
end
for k, d in ipairs(DIMS) do
  if levels[k] then put('lvl_' .. d, string.format('%.6f', levels[k])) end
end
redis.call('HSET', KEYS[1], unpack(updates))
redis.call('EXPIRE', KEYS[1], ARGV[7])
return {levels[1] and tostring(levels[1]) or '', levels[2] and tostring(levels[2]) or '',
        levels[3] and tostring(levels[3]) or ''}
