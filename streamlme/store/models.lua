-- Versioned model records of one namespace, and the refresh leader's lease that fences writes.
--
-- KEYS[1] models hash (version -> record)   KEYS[2] version counter   KEYS[3] current version
-- KEYS[4] highest fencing token used        KEYS[5] lease ("owner|token", with a TTL)
-- KEYS[6] lease token counter               KEYS[7] the namespace's meta hash (pin, flag, epoch)
-- ARGV[1] "put":     ARGV[2] record, ARGV[3] fencing token or "", ARGV[4] versions to keep
--         "get":     ARGV[2] version or "" for the current one      -> record or nil
--         "current": ARGV[2] version                               -> version
--         "acquire": ARGV[2] owner, ARGV[3] ttl ms   -> {1, token} or {0, holder, ms left}
--         "renew":   ARGV[2] owner, ARGV[3] token, ARGV[4] ttl ms  -> 1 if still ours, else 0
--         "release": ARGV[2] owner, ARGV[3] token                  -> 1 if it was ours, else 0
--         "holder":                                    -> {holder, ms left} or {} if free
--         "put_checked": as "put", ARGV[5] the namespace epoch the record was fitted from;
--                    refused (nothing written) while a version is pinned, while the namespace
--                    is flagged, or when its epoch is no longer ARGV[5]
--         "pin":     ARGV[2] version, ARGV[3] now (unix time) -> version, made current and pinned
--         "unpin":                                  -> the version that was pinned, or nil
--
-- The pin is the field "pinned" (with "pinned_at") of the meta hash: deleted with the
-- namespace, so a namespace that comes back empty is never pinned to a version it lacks. Pin and
-- current are set together here, and "put_checked" reads the pin in the same script that
-- writes, so a refresher that started its fit before `model --rollback` cannot undo the pin.
--
-- Fencing: a put carrying a token is refused unless the lease is held right now with that token
-- and no larger token was used before (a put without a token is not checked). Checking
-- the lease here, in the same script that writes, is what stops a leader whose lease expired
-- mid-fit even when nobody has taken the lease since. Tokens only grow: acquire takes the next
-- one from the counter, never below a token a put has already shown.

local op = ARGV[1]

local function holder_token(holder)
  if not holder then return nil end
  return tonumber(string.match(holder, '|(%d+)$'))
end

local function put()
  local fence = ARGV[3]
  if fence ~= '' then
    local token = tonumber(fence)
    local held = holder_token(redis.call('GET', KEYS[5]))
    if held ~= token then
      local why = held and ('the lease is held with token ' .. held)
        or 'the lease expired or was released'
      return redis.error_reply('STALE_FENCE token ' .. fence .. ' is not the lease: ' .. why)
    end
    local seen = redis.call('GET', KEYS[4])
    if seen and tonumber(seen) > token then
      return redis.error_reply('STALE_FENCE token ' .. fence .. ' is older than ' .. seen)
    end
    redis.call('SET', KEYS[4], fence)
  end
  local version = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], version, ARGV[2])
  redis.call('SET', KEYS[3], version)
  local keep = tonumber(ARGV[4])
  if redis.call('HLEN', KEYS[1]) > keep then
    local versions = redis.call('HKEYS', KEYS[1])
    for i = 1, #versions do versions[i] = tonumber(versions[i]) end
    table.sort(versions)
    for i = 1, #versions - keep do
      redis.call('HDEL', KEYS[1], versions[i])
    end
  end
  return version
end

if op == 'put' then
  return put()
elseif op == 'put_checked' then
  local pinned, flag, epoch = unpack(redis.call('HMGET', KEYS[7], 'pinned', 'flag', 'epoch'))
  if pinned then
    return redis.error_reply('PINNED version ' .. pinned .. ' is pinned')
  end
  if flag then
    return redis.error_reply('FLAGGED the namespace is flagged ' .. flag)
  end
  if (epoch or '') ~= ARGV[5] then
    return redis.error_reply('EPOCH the namespace epoch is ' .. tostring(epoch or 'none')
      .. ', not ' .. ARGV[5] .. ' (it was reset)')
  end
  return put()
elseif op == 'pin' then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then
    return redis.error_reply('NO_VERSION model version ' .. ARGV[2] .. ' is not stored')
  end
  redis.call('SET', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[7], 'pinned', ARGV[2], 'pinned_at', ARGV[3])
  return tonumber(ARGV[2])
elseif op == 'unpin' then
  local pinned = redis.call('HGET', KEYS[7], 'pinned')
  redis.call('HDEL', KEYS[7], 'pinned', 'pinned_at')
  return pinned
elseif op == 'get' then
  local version = ARGV[2]
  if version == '' then
    version = redis.call('GET', KEYS[3])
    if not version then return false end
  end
  return redis.call('HGET', KEYS[1], version)
elseif op == 'current' then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then
    return redis.error_reply('NO_VERSION model version ' .. ARGV[2] .. ' is not stored')
  end
  redis.call('SET', KEYS[3], ARGV[2])
  return tonumber(ARGV[2])
elseif op == 'acquire' then
  local holder = redis.call('GET', KEYS[5])
  if holder then
    if string.sub(holder, 1, #ARGV[2] + 1) == ARGV[2] .. '|' then
      redis.call('PEXPIRE', KEYS[5], ARGV[3])
      return {1, holder_token(holder)}
    end
    return {0, holder, redis.call('PTTL', KEYS[5])}
  end
  local token = redis.call('INCR', KEYS[6])
  local seen = tonumber(redis.call('GET', KEYS[4]) or '0')
  if token <= seen then
    token = seen + 1
    redis.call('SET', KEYS[6], token)
  end
  redis.call('SET', KEYS[5], ARGV[2] .. '|' .. token, 'PX', ARGV[3])
  return {1, token}
elseif op == 'renew' then
  if redis.call('GET', KEYS[5]) == ARGV[2] .. '|' .. ARGV[3] then
    redis.call('PEXPIRE', KEYS[5], ARGV[4])
    return 1
  end
  return 0
elseif op == 'release' then
  if redis.call('GET', KEYS[5]) == ARGV[2] .. '|' .. ARGV[3] then
    redis.call('DEL', KEYS[5])
    return 1
  end
  return 0
elseif op == 'holder' then
  local holder = redis.call('GET', KEYS[5])
  if not holder then return {} end
  return {holder, redis.call('PTTL', KEYS[5])}
end
return redis.error_reply('unknown operation ' .. tostring(op))
