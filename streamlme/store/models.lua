-- Versioned model records of one namespace: put (new version, becomes current), get, set current.
--
-- KEYS[1] models hash (version -> record)   KEYS[2] version counter   KEYS[3] current version
-- KEYS[4] fencing token
-- ARGV[1] "put":     ARGV[2] record, ARGV[3] fencing token or "", ARGV[4] versions to keep
--         "get":     ARGV[2] version or "" for the current one      -> record or nil
--         "current": ARGV[2] version                               -> version
--
-- Fencing: a writer passes the token of its lease (issued by the leader election, which is
-- designed elsewhere). A put carrying a smaller token than one already seen is refused, so a
-- deposed leader that wakes up late cannot overwrite its successor's model.

local op = ARGV[1]

if op == 'put' then
  local fence = ARGV[3]
  if fence ~= '' then
    local seen = redis.call('GET', KEYS[4])
    if seen and tonumber(seen) > tonumber(fence) then
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
end
return redis.error_reply('unknown operation ' .. tostring(op))
