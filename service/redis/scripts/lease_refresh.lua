-- Renews a lease its holder still owns. KEYS lease.  ARGV token, ms.
-- Returns 1 renewed, 0 when someone else holds it now (or nobody).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
