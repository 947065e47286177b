-- Apply one shard's part of a micro-batch and record that shard's Kafka offsets, all or nothing.
--
-- The arithmetic mirrors streamlme.stats (merge_moments, retract_moments, GroupStats.decay_to)
-- operation for operation, so results equal the Python merge bit for bit (with decay, Lua's
-- 2^x may differ from numpy.exp2 in the last bit).
-- Values are streamlme.stats byte records: 4-byte header ("SL", format version, d), then
-- little-endian float64 n, t, mean[d], upper triangle of C (row-major), as struct '<d...'.
--
-- Every key is one shard's (one hash tag, so one Redis Cluster slot):
-- KEYS[1] shard meta hash   KEYS[2] statistics hash (encoded cell id -> record)
-- KEYS[3] offsets hash      KEYS[4] index of cells by level (sorted set, see below)
-- ARGV[1] header shared by every delta   ARGV[2] half-life, or "" for no decay
-- ARGV[3] na   ARGV[4] nr   ARGV[5] adds, concatenated records   ARGV[6] retracts, likewise
-- ARGV[7] columns (JSON) or ""   ARGV[8] noff, the number of offset triples
-- ARGV[9 .. 8+3*noff] offsets as triples: field ("topic:partition"), batch start, batch end
-- then na encoded ids of the adds, then nr encoded ids of the retracts
--
-- Returns {0, field, recorded, ...} if a partition's recorded offset is not the batch start
-- (nothing changed), else {1, i, ...}: 1-based indices of retractions refused as overdrawn.
-- Everything that could fail is checked before the first write: Redis does not roll back a
-- script that errors half-way. A call that changes statistics bumps the shard's meta
-- ``version`` (what a distributed refresh keys a shard's cached block by).
--
-- A new cell whose id is a JSON array of two or more strings is a cell of a model with several
-- grouping columns (element i its level of grouping column i): it is also added to the index
-- KEYS[4] as members "<i>:<encoded level>:<encoded cell id>" (score 0), so that the cells of a
-- level are one ZRANGEBYLEX per shard. Ids of a one-column model cost one prefix test.

local s_unpack, s_pack, unpack, sub = struct.unpack, struct.pack, unpack, string.sub
local header = ARGV[1]
local d = string.byte(header, 4)
local half_life = tonumber(ARGV[2])
local na, nr = tonumber(ARGV[3]), tonumber(ARGV[4])
local adds, retracts = ARGV[5], ARGV[6]
local columns = ARGV[7]
local noff = tonumber(ARGV[8])
local id0 = 8 + 3 * noff  -- ARGV[id0 + i] is the i-th encoded id

local ntri = d * (d + 1) / 2
local nvals = 2 + d + ntri
local size = 4 + 8 * nvals
local fmt = '<' .. string.rep('d', nvals)
local CHUNK = 1000

-- 1. the namespace must hold statistics of this width (and these columns, if both are known)
local meta = redis.call('HMGET', KEYS[1], 'd', 'columns')
local touches = na + nr > 0  -- a batch with no groups only moves offsets; its width is moot
if touches and meta[1] and tonumber(meta[1]) ~= d then
  return redis.error_reply('WIDTH namespace holds statistics of ' .. meta[1] ..
    ' columns, the batch has ' .. d)
end
if touches and meta[2] and columns ~= '' and meta[2] ~= columns then
  return redis.error_reply('COLUMNS namespace holds columns ' .. meta[2] ..
    ', the batch has ' .. columns)
end

-- 2. every partition must continue exactly where the recorded offset ends
if noff > 0 then
  local fields = {}
  for i = 1, noff do fields[i] = ARGV[6 + 3 * i] end
  local recorded = redis.call('HMGET', KEYS[3], unpack(fields))
  local conflicts = {}
  for i = 1, noff do
    local r = recorded[i]
    if r and r ~= ARGV[7 + 3 * i] then
      conflicts[#conflicts + 1] = fields[i]
      conflicts[#conflicts + 1] = r
    end
  end
  if #conflicts > 0 then
    table.insert(conflicts, 1, 0)
    return conflicts
  end
end

-- 3. read every value the batch touches and check it is a record of this width
local function read(first, count)
  local values = {}
  for lo = first, first + count - 1, CHUNK do
    local hi = math.min(lo + CHUNK - 1, first + count - 1)
    local got = redis.call('HMGET', KEYS[2], unpack(ARGV, id0 + lo, id0 + hi))
    for j = 1, #got do
      local v = got[j]
      if v and (#v ~= size or sub(v, 1, 4) ~= header) then
        return nil, ARGV[id0 + lo + j - 1]
      end
      values[lo - first + j] = v
    end
  end
  return values
end
local cur_a, bad_a = read(1, na)
if not cur_a then return redis.error_reply('CORRUPT ' .. bad_a .. ' is not a record of width ' .. d) end
local cur_r, bad_r = read(1 + na, nr)
if not cur_r then return redis.error_reply('CORRUPT ' .. bad_r .. ' is not a record of width ' .. d) end

local inf = math.huge
local function fmax(x, y)  -- numpy.fmax: NaN only if both are NaN
  if x ~= x then return y end
  if y ~= y then return x end
  if x > y then return x end
  return y
end
local function finite(x) return x == x and x ~= inf and x ~= -inf end

-- Records are tables {n, t, mean[1..d], C upper triangle}; c0 is the index before C.
local c0 = 2 + d

-- GroupStats.decay_to for one record: age mass n and C to time t
local function decay(s, t)
  local t_old = s[2]
  if finite(t_old) then
    local dt = t - t_old
    if dt < 0 then dt = 0 end
    local f = 2 ^ (-dt / half_life)
    s[1] = s[1] * f
    for k = c0 + 1, nvals do s[k] = s[k] * f end
  end
  s[2] = fmax(t_old, t)
end

local out_fmt = '<BBBB' .. string.sub(fmt, 2)
local magic1, magic2, version = string.byte(header, 1, 3)
local function pack(s)
  return s_pack(out_fmt, magic1, magic2, version, d, unpack(s, 1, nvals))
end

local function zadd(key, members)
  for lo = 1, #members, 2 * CHUNK do
    redis.call('ZADD', key, unpack(members, lo, math.min(lo + 2 * CHUNK - 1, #members)))
  end
end

local function flush(pairs_)
  for lo = 1, #pairs_, 2 * CHUNK do
    redis.call('HSET', KEYS[2], unpack(pairs_, lo, math.min(lo + 2 * CHUNK - 1, #pairs_)))
  end
end

-- The index entries of a new group with encoded id `id` (streamlme.store.keys.encode_group:
-- every byte outside [A-Za-z0-9_.~-] as %XX), appended to `ix`.
local function unhex(h) return string.char(tonumber(h, 16)) end
local function hex(c) return string.format('%%%02X', string.byte(c)) end
local function index_cell(id, ix)
  local ok, levels = pcall(cjson.decode, (string.gsub(id, '%%(%x%x)', unhex)))
  if not ok or type(levels) ~= 'table' or #levels < 2 then return end
  for i = 1, #levels do
    if type(levels[i]) ~= 'string' then return end
  end
  for i = 1, #levels do
    ix[#ix + 1] = 0
    ix[#ix + 1] = (i - 1) .. ':' .. (string.gsub(levels[i], '[^A-Za-z0-9_%.~%-]', hex)) .. ':' .. id
  end
end

local delta = {}

-- The co-moment part of the pairwise update, upper triangle in place: s_C + b_C + w delta delta'
-- (sign +1, merge) or s_C - b_C - w delta delta' (sign -1, retract), delta the means' difference.
-- Multiplying by +-1 is exact, so each sum rounds as in streamlme.stats, to the bit.
local function comoments(s, b, w, sign)
  local k = c0
  for row = 1, d do
    local wd = w * delta[row]
    for col = row, d do
      k = k + 1
      s[k] = s[k] + sign * b[k] + sign * (wd * delta[col])
    end
  end
end
local written = {}  -- new values by key, so retractions see this batch's additions

-- 4. additions: pairwise (Chan et al.) merge, as merge_moments, computed in place in a
local out, no, ix = {}, 0, {}
for i = 1, na do
  local key = ARGV[id0 + i]
  local b = {s_unpack(fmt, adds, (i - 1) * size + 5)}
  local a
  if cur_a[i] then
    a = {s_unpack(fmt, cur_a[i], 5)}
  else
    a = {0, 0 / 0}
    for k = 3, nvals do a[k] = 0 end
    if sub(key, 1, 3) == '%5B' then index_cell(key, ix) end
  end
  if half_life then
    local t = fmax(a[2], b[2])
    decay(a, t)
    decay(b, t)
  end
  local n_a, n_b = a[1], b[1]
  local n = n_a + n_b
  local safe = n
  if not (n > 0) then safe = 1.0 end
  local r = n_b / safe
  for j = 1, d do
    local m = a[2 + j]
    local dj = b[2 + j] - m
    delta[j] = dj
    a[2 + j] = m + dj * r
  end
  comoments(a, b, n_a * n_b / safe, 1)
  a[1] = n
  a[2] = fmax(a[2], b[2])
  local v = pack(a)
  out[no + 1] = key
  out[no + 2] = v
  no = no + 2
  if nr > 0 then written[key] = v end
end
flush(out)
zadd(KEYS[4], ix)

-- 5. retractions: inverse update, as retract_moments, in place; refuse to overdraw a group
local overdrawn = {1}
out, no = {}, 0
for i = 1, nr do
  local key = ARGV[id0 + na + i]
  local cur = written[key] or cur_r[i]
  local b = {s_unpack(fmt, retracts, (i - 1) * size + 5)}
  local s = cur and {s_unpack(fmt, cur, 5)}
  if not s or s[1] - b[1] < -1e-9 * s[1] then
    overdrawn[#overdrawn + 1] = i
  else
    local n, n_b = s[1], b[1]
    local n_a = n - n_b
    local empty = n_a <= 1e-12 * math.max(n, 1.0)
    if empty then
      for k = 3, nvals do s[k] = 0 end
      s[1] = 0
    else
      local r = n_b / n_a
      for j = 1, d do
        local m = s[2 + j]
        local m_a = m + r * (m - b[2 + j])
        delta[j] = b[2 + j] - m_a
        s[2 + j] = m_a
      end
      comoments(s, b, n_a * n_b / n, -1)
      s[1] = n_a
    end
    local v = pack(s)
    out[no + 1] = key
    out[no + 2] = v
    no = no + 2
    written[key] = v
  end
end
flush(out)

-- 6. offsets and metadata
if noff > 0 then
  local hset = {}
  for i = 1, noff do
    hset[#hset + 1] = ARGV[6 + 3 * i]
    hset[#hset + 1] = ARGV[8 + 3 * i]
  end
  redis.call('HSET', KEYS[3], unpack(hset))
end
if touches then
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  if not meta[1] then
    redis.call('HSET', KEYS[1], 'd', d, 'format', string.byte(header, 3))
  end
  if not meta[2] and columns ~= '' then
    redis.call('HSET', KEYS[1], 'columns', columns)
  end
end
return overdrawn
