-- Sets `now` in µs from the argument named where it is included ('' = the Redis server's TIME),
-- shared by every script that reads the clock, so workers on every machine agree on one clock.
-- Redis < 7 replicates scripts verbatim unless told otherwise, and TIME is not replayable.
if redis.replicate_commands then redis.replicate_commands() end
local now
if {arg} ~= '' then
  now = tonumber({arg})
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
