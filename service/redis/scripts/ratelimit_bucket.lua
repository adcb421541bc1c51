-- The sync limiter's buckets, shared by ratelimit_acquire and ratelimit_observe (after clock).
-- KEYS[1] the limiter's hash, KEYS[2] its calls in flight (ZSET). ARGV[2..4] configured requests,
-- images, tokens per minute (0 = none); ARGV[5] the burst (µs of the configured rate) held
-- before upstream has been heard; ARGV[6] the headroom (share of a learned bucket left unspent);
-- ARGV[7] idle expiry (s); ARGV[8] how long a call may be in flight (µs) before it is dropped.
-- Hash fields per dimension d in r, i, t: lvl_d (units at `at`), sum_d (units ever granted),
-- out_d (units in flight); learned from upstream: cap_d, rate_d (units/s), f_d (others' use,
-- units/s), until_d (µs), seen_d / seen_q_d (the newest answer's grant time and order),
-- anc_t_d / anc_r_d / anc_s_d (the newest answer with nothing else in flight: its grant time,
-- upstream's remaining and our sum then).
local DIMS = {'r', 'i', 't'}
local state = {}
do
  local raw = redis.call('HGETALL', KEYS[1])
  for n = 1, #raw, 2 do state[raw[n]] = raw[n + 1] end
end
local function num(x) if x == nil or x == '' then return nil end return tonumber(x) end
local since = math.max(0, now - (num(state['at']) or now)) / 1000000

-- The gross refill rate (units/s) upstream's bucket is believed to have.
local function gross_rate(d, k, cap)
  local configured = tonumber(ARGV[1 + k]) / 60
  local learned = num(state['rate_' .. d])
  if learned and learned > 0 then return learned end
  if configured > 0 then return configured end
  return cap / 60
end

-- The bucket of dimension d (index k) as it stands now, or nil when it has no limit:
-- {cap, rate (what we may spend per s), margin (units kept back), level (units now)}.
local function bucket(d, k)
  local configured = tonumber(ARGV[1 + k]) / 60
  local cap, rate, margin
  local learned_until = num(state['until_' .. d])
  if learned_until and learned_until > now and num(state['cap_' .. d]) then
    cap = num(state['cap_' .. d])
    local gross = gross_rate(d, k, cap)
    rate = math.max(gross - (num(state['f_' .. d]) or 0), gross * 0.1)
    if configured > 0 and configured < rate then rate = configured end
    margin = cap * tonumber(ARGV[6])
  elseif configured > 0 then
    rate = configured
    cap = rate * tonumber(ARGV[5]) / 1000000
    margin = 0
  else
    return nil
  end
  local level = num(state['lvl_' .. d]) or cap
  level = math.min(cap, level + since * rate)
  return {cap = cap, rate = rate, margin = margin, level = level}
end

-- Drop calls in flight longer than ARGV[8] (their worker died): they no longer hold units.
local function forget_stale()
  local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now - tonumber(ARGV[8])))
  for _, member in ipairs(stale) do
    local _, i, t = member:match('^(%d+):(%d+):(%d+)$')
    state['out_r'] = tostring(math.max(0, (num(state['out_r']) or 0) - 1))
    state['out_i'] = tostring(math.max(0, (num(state['out_i']) or 0) - (tonumber(i) or 0)))
    state['out_t'] = tostring(math.max(0, (num(state['out_t']) or 0) - (tonumber(t) or 0)))
    redis.call('ZREM', KEYS[2], member)
  end
  if #stale > 0 then
    redis.call('HSET', KEYS[1], 'out_r', state['out_r'], 'out_i', state['out_i'],
               'out_t', state['out_t'])
  end
  return #stale
end
