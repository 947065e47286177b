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
-- KEYS[5] dead letters hash ("topic:partition:offset" -> dead-letter record bytes)
-- ARGV[1] header shared by every delta   ARGV[2] half-life, or "" for no decay
-- ARGV[3] na   ARGV[4] nr   ARGV[5] adds, concatenated records   ARGV[6] retracts, likewise
-- ARGV[7] columns (JSON) or ""   ARGV[8] noff, the number of offset triples
-- ARGV[9] ns, the number of steps   ARGV[10] the steps' records, concatenated
-- ARGV[11] the steps' kinds, one byte each ("a" add, "r" retract)
-- ARGV[12] "start" when the call records partitions' starts (a shard without a record of a
--          partition takes any start), else ""
-- ARGV[13 .. 12+3*noff] offsets as triples: field ("topic:partition"), batch start, batch end
-- then na encoded ids of the adds, nr of the retracts, ns of the steps, then per step its
-- dead-letter field and its dead-letter record ("" for none)
--
-- Adds (groups without a retraction in the batch, aggregated) apply first, then the aggregated
-- retracts (one per group), then the steps in order: the per-event path of groups with
-- retractions in the batch (runs of adds aggregated, each retraction alone), so that whether a
-- retraction is refused does not depend on how the stream was cut into batches.
--
-- A retraction is refused (overdrawn) when its group has no record, when it takes out more mass
-- than the group holds, or when it would leave a co-moment diagonal negative beyond rounding
-- (a row that was never added); a refused step with a dead-letter record stores it in KEYS[5]
-- in this very call, so it survives a crash of the caller.
--
-- Returns, changing nothing:
--   {0, field, recorded, ...} if a partition's recorded offset is not the batch start;
--   {2, field, ...} if the shard has no record of a partition and the call is not "start"
--   (statistics without their offsets: the shard lost state);
--   {3, id} if cell id's result would hold a non-finite value;
-- else {1, i, ...}: 1-based indices (retracts 1..nr, then steps nr+1..nr+ns) refused as
-- overdrawn. Everything that could fail is checked before the first write: Redis does not roll
-- back a script that errors half-way. A call that changes statistics bumps the shard's meta
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
local ns = tonumber(ARGV[9])
local steps, kinds = ARGV[10], ARGV[11]
local starting = ARGV[12] == 'start'
local off0 = 12  -- ARGV[off0 + 3i - 2 .. off0 + 3i] is the i-th offset triple
local id0 = off0 + 3 * noff  -- ARGV[id0 + i] is the i-th encoded id
local dl0 = id0 + na + nr + ns  -- ARGV[dl0 + 2i - 1], ARGV[dl0 + 2i]: step i's dead letter

local ntri = d * (d + 1) / 2
local nvals = 2 + d + ntri
local size = 4 + 8 * nvals
local fmt = '<' .. string.rep('d', nvals)
local CHUNK = 1000
local RTOL = 1e-9  -- streamlme.store.policy.OVERDRAW_RTOL

-- 1. the namespace must hold statistics of this width (and these columns, if both are known)
local meta = redis.call('HMGET', KEYS[1], 'd', 'columns')
local touches = na + nr + ns > 0  -- a batch with no groups only moves offsets; its width is moot
if touches and meta[1] and tonumber(meta[1]) ~= d then
  return redis.error_reply('WIDTH namespace holds statistics of ' .. meta[1] ..
    ' columns, the batch has ' .. d)
end
if touches and meta[2] and columns ~= '' and meta[2] ~= columns then
  return redis.error_reply('COLUMNS namespace holds columns ' .. meta[2] ..
    ', the batch has ' .. columns)
end

-- 2. every partition must continue exactly where the recorded offset ends, and have a record
-- unless this call records its start
if noff > 0 then
  local fields = {}
  for i = 1, noff do fields[i] = ARGV[off0 + 3 * i - 2] end
  local recorded = redis.call('HMGET', KEYS[3], unpack(fields))
  local conflicts, missing = {}, {}
  for i = 1, noff do
    local r = recorded[i]
    if r and r ~= ARGV[off0 + 3 * i - 1] then
      conflicts[#conflicts + 1] = fields[i]
      conflicts[#conflicts + 1] = r
    elseif not r and not starting then
      missing[#missing + 1] = fields[i]
    end
  end
  if #conflicts > 0 then
    table.insert(conflicts, 1, 0)
    return conflicts
  end
  if #missing > 0 then
    table.insert(missing, 1, 2)
    return missing
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
local cur, bad = read(1, na + nr + ns)
if not cur then return redis.error_reply('CORRUPT ' .. bad .. ' is not a record of width ' .. d) end

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

local function hset(key, pairs_)
  for lo = 1, #pairs_, 2 * CHUNK do
    redis.call('HSET', key, unpack(pairs_, lo, math.min(lo + 2 * CHUNK - 1, #pairs_)))
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

-- New values by key (tables), so later steps see this batch's earlier ones; `order` lists the
-- keys in the order they were first written, and nothing is written before every one is checked.
local written, order, ix = {}, {}, {}
local function current(i, key)
  local s = written[key]
  if s then return s end
  if cur[i] then
    s = {s_unpack(fmt, cur[i], 5)}
    s[nvals + 1] = nil  -- struct.unpack's trailing position
    return s
  end
  return nil
end
local function keep(key, s)
  if not written[key] then order[#order + 1] = key end
  written[key] = s
end

-- additions: pairwise (Chan et al.) merge, as merge_moments, computed in place in a
local function add(i, key, records, at)
  local b = {s_unpack(fmt, records, at)}
  local a = current(i, key)
  if not a then
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
  keep(key, a)
end

-- retractions: inverse update, as retract_moments; false (nothing changed) when overdrawn
local function retract(i, key, records, at)
  local s = current(i, key)
  local b = {s_unpack(fmt, records, at)}
  if not s or s[1] - b[1] < -RTOL * s[1] then return false end
  local n, n_b = s[1], b[1]
  local n_a = n - n_b
  local out = {}
  if n_a <= 1e-12 * math.max(n, 1.0) then
    for k = 3, nvals do out[k] = 0 end
    out[1], out[2] = 0, s[2]
  else
    for k = 1, nvals do out[k] = s[k] end
    local r = n_b / n_a
    for j = 1, d do
      local m = s[2 + j]
      local m_a = m + r * (m - b[2 + j])
      delta[j] = b[2 + j] - m_a
      out[2 + j] = m_a
    end
    local w = n_a * n_b / n
    comoments(out, b, w, -1)
    out[1] = n_a
    -- no co-moment diagonal may go negative beyond rounding: the row was never added
    local k = c0
    for row = 1, d do
      k = k + 1
      local wd = w * delta[row]
      local scale = s[k] + b[k] + math.abs(wd) * (math.abs(delta[row]) + math.abs(s[2 + row])
                                                  + math.abs(b[2 + row]))
      if out[k] < -RTOL * scale then return false end
      k = k + d - row
    end
  end
  keep(key, out)
  return true
end

-- 4. the batch, in order: adds, aggregated retracts, steps
for i = 1, na do add(i, ARGV[id0 + i], adds, (i - 1) * size + 5) end
local overdrawn = {1}
for i = 1, nr do
  if not retract(na + i, ARGV[id0 + na + i], retracts, (i - 1) * size + 5) then
    overdrawn[#overdrawn + 1] = i
  end
end
local dead = {}
for i = 1, ns do
  local j = na + nr + i
  local key, at = ARGV[id0 + j], (i - 1) * size + 5
  if sub(kinds, i, i) == 'a' then
    add(j, key, steps, at)
  elseif not retract(j, key, steps, at) then
    overdrawn[#overdrawn + 1] = nr + i
    if ARGV[dl0 + 2 * i] ~= '' then
      dead[#dead + 1] = ARGV[dl0 + 2 * i - 1]
      dead[#dead + 1] = ARGV[dl0 + 2 * i]
    end
  end
end

-- 5. refuse (nothing written) a result that is not finite; then write everything
local out = {}
for j, key in ipairs(order) do
  local s = written[key]
  local z = s[1] * 0  -- 0 while every value is finite: x * 0 is NaN for NaN and +-inf
  for k = 3, nvals do z = z + s[k] * 0 end
  if z ~= 0 then return {3, key} end
  out[2 * j - 1] = key
  out[2 * j] = pack(s)
end
hset(KEYS[2], out)
zadd(KEYS[4], ix)
hset(KEYS[5], dead)

-- 6. offsets and metadata
if noff > 0 then
  local offs = {}
  for i = 1, noff do
    offs[#offs + 1] = ARGV[off0 + 3 * i - 2]
    offs[#offs + 1] = ARGV[off0 + 3 * i]
  end
  redis.call('HSET', KEYS[3], unpack(offs))
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
