-- KEYS limiter.  ARGV now, rpm, ipm, tpm, burst µs, headroom, idle expiry s, learned ttl µs,
-- the grant's time µs and sums r, i, t ('' = not known: taken as just now), then per dimension
-- r, i, t: upstream's limit, remaining, reset µs ('' = header absent).
-- Sets each dimension upstream spoke of to what upstream says is left, less what we granted after
-- the observed request (it had not reached upstream yet), plus the refill since; learns the
-- bucket's size and refill rate, and how fast others spend from it. Returns the levels.
--! include clock(ARGV[1])
--! include ratelimit_bucket()
local ttl = tonumber(ARGV[8])
local granted_at = num(ARGV[9]) or now
-- Answers are ordered by the grant's place in the cluster's sequence of requests (its mark of
-- requests: grants in one microsecond still differ); an answer without a grant is the newest.
local order = num(ARGV[10]) or math.huge
local updates = {'at', string.format('%.0f', now)}
local function put(field, value) updates[#updates + 1] = field; updates[#updates + 1] = value end
local levels = {}
for k, d in ipairs(DIMS) do
  local b = bucket(d, k)
  if b then levels[k] = b.level end
end
for k, d in ipairs(DIMS) do
  local base = 13 + (k - 1) * 3
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
    local ours = (num(state['sum_' .. d]) or 0)
    local mark = num(ARGV[9 + k]) or ours
    local others = num(state['f_' .. d]) or 0
    local seen = num(state['seen_' .. d])
    local newest = not seen or order >= (num(state['seen_q_' .. d]) or 0)
    if newest and seen and granted_at > seen then
      -- Others' use since the previous observation: what the bucket should hold by our
      -- spending alone, less what it holds. Smoothed over about five seconds.
      local dt = (granted_at - seen) / 1000000
      local expected = math.min(limit, num(state['obs_r_' .. d]) + rate * dt)
        - (mark - num(state['obs_s_' .. d]))
      local alpha = math.min(1, dt / 5)
      others = others + alpha * ((expected - remaining) / dt - others)
      others = math.max(0, math.min(rate * 0.95, others))
    end
    local net = math.max(rate - others, rate * 0.05)
    local truth = math.min(limit, remaining + net * math.max(0, now - granted_at) / 1000000)
      - (ours - mark)
    if newest then
      levels[k] = truth
      put('seen_' .. d, string.format('%.0f', granted_at))
      put('seen_q_' .. d, string.format('%.0f', num(ARGV[10]) or num(state['sum_r']) or 0))
      put('obs_r_' .. d, tostring(remaining))
      put('obs_s_' .. d, string.format('%.0f', mark))
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
