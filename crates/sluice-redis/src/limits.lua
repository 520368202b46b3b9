-- Sluice's limit algorithms (sluice-core's sliding, gcra and fixed) over
-- Redis state: one call decides every limit of a request all-or-nothing.
--
-- Numbers. Lua 5.1 has only doubles, exact for integers below 2^53, and
-- nanosecond timestamps are ~2^61. So every stored instant is a pair
-- {seconds, nanoseconds} and, within a call, is turned into nanoseconds
-- relative to the call's `now`, which is exact for instants within 104 days
-- of it (stored state never lives longer than its window, at most 31 days,
-- plus a lease). Limits and amounts are < 2^53 (sluice-core's MAX_LIMIT);
-- GCRA products (amount x window) are split into quotient and remainder of
-- the rate by `muldivmod`, so no product is ever rounded. Time comes from
-- the server (TIME) unless the caller passes one (the conformance tests).
--
-- KEYS: 1 leases (hash id -> lease), 2 lease expiries (zset, ms),
--       3 lease id counter, 4 settled-by-expiry ids (zset, ms),
--       5.. one hash per subject (field: limit state name -> state).
--       (The cluster ops at the end declare their own keys.)
-- ARGV: 1 op, 2 time ("" = server time, else "SECONDS NANOS"), then per op.

local op = ARGV[1]
local NS, NN
if ARGV[2] == '' then
  local t = redis.call('TIME')
  NS, NN = tonumber(t[1]), tonumber(t[2]) * 1000
else
  local s, n = string.match(ARGV[2], '^(%d+) (%d+)$')
  NS, NN = tonumber(s), tonumber(n)
end
local E9 = 1000000000

-- instants ------------------------------------------------------------------

-- ns relative to now of the instant {s, n}
local function rel(s, n) return (s - NS) * E9 + (n - NN) end
-- the instant of a relative time, as {s, n}
local function abs(r)
  local n = NN + r
  local c = math.floor(n / E9)
  return NS + c, n - c * E9
end
local function text(s, n) return string.format('%d%09d', s, n) end
local function rtext(r) return text(abs(r)) end
-- a decimal ns instant -> relative ns
local function parse(str)
  if #str > 9 then
    return rel(tonumber(string.sub(str, 1, -10)), tonumber(string.sub(str, -9)))
  end
  return rel(0, tonumber(str))
end
local NOW_TEXT = text(NS, NN)

-- exact integer arithmetic -----------------------------------------------------

local function imod(a, m)
  local r = a % m
  if r < 0 then r = r + m elseif r >= m then r = r - m end
  return r
end
-- a * b mod m for a, b >= 0, m < 2^52
local function mulmod(a, b, m)
  local r = 0
  a = imod(a, m)
  while b > 0 do
    if b % 2 == 1 then r = r + a; if r >= m then r = r - m end end
    a = a + a; if a >= m then a = a - m end
    b = math.floor(b / 2)
  end
  return r
end
-- (floor(a*b/m), a*b mod m) for a, b >= 0, m < 2^52, quotient < 2^53
local function muldivmod(a, b, m)
  if a * b < 4503599627370496 then
    local p = a * b
    local r = imod(p, m)
    return (p - r) / m, r
  end
  local ar = imod(a, m)
  local aq = (a - ar) / m
  local bits = {}
  while b > 0 do
    bits[#bits + 1] = b % 2
    b = math.floor(b / 2)
  end
  local q, r = 0, 0
  for i = #bits, 1, -1 do
    q, r = q + q, r + r
    if r >= m then r = r - m; q = q + 1 end
    if bits[i] == 1 then
      q, r = q + aq, r + ar
      if r >= m then r = r - m; q = q + 1 end
    end
  end
  return q, r
end
-- now mod g, g < 2^52
local function phase(g)
  return imod(mulmod(NS, E9, g) + NN, g)
end

-- limits ----------------------------------------------------------------------
-- A limit spec: {key, field, algo ('s'|'g'|'f'), W, L, p (sliding granularity
-- or gcra burst), metric index, metric name, window text, fixed window ends
-- ("" or "E0,E1,E2": consecutive ends around the caller's clock)}.

local function capacity(l) if l.algo == 'g' then return l.p end return l.L end

-- end of the fixed window containing relative instant r
local function fixed_end(l, r)
  local e = {}
  for x in string.gmatch(l.ends, '%d+') do e[#e + 1] = parse(x) end
  for i = 1, #e do
    if r < e[i] then return e[i] end
  end
  -- past the last end the caller gave (a long lease): the windows repeat
  local p = e[#e] - e[#e - 1]
  return e[#e] + (math.floor((r - e[#e]) / p) + 1) * p
end

-- state: decoded, times relative to now
local function load(l, raw)
  local st = {}
  if raw then
    local v = cmsgpack.unpack(raw)
    if l.algo == 's' and v.a == 's' then
      st.b = {}
      for i = 1, #v.b, 3 do
        st.b[#st.b + 1] = { rel(v.b[i], v.b[i + 1]), v.b[i + 2] }
      end
    elseif l.algo == 'g' and v.a == 'g' then
      st.t, st.f, st.scale = rel(v.t[1], v.t[2]), v.f, v.scale
    elseif l.algo == 'f' and v.a == 'f' then
      st.we, st.used = rel(v.we[1], v.we[2]), v.used
    end
  end
  if l.algo == 's' then st.b = st.b or {}
  elseif l.algo == 'g' then st.t = st.t or 0; st.f = st.f or 0; st.scale = st.scale or 0
  else st.we = st.we or -1; st.used = st.used or 0 end
  return st
end

local function save(l, st)
  local v
  if l.algo == 's' then
    local b = {}
    for _, x in ipairs(st.b) do
      local s, n = abs(x[1])
      b[#b + 1] = s; b[#b + 1] = n; b[#b + 1] = x[2]
    end
    v = { a = 's', b = b }
  elseif l.algo == 'g' then
    local s, n = abs(st.t)
    v = { a = 'g', t = { s, n }, f = st.f, scale = st.scale }
  else
    local s, n = abs(st.we)
    v = { a = 'f', we = { s, n }, used = st.used }
  end
  return cmsgpack.pack(v)
end

-- GCRA: the bucket holds (t + f/scale) ns of drain from now, i.e.
-- t*scale + f window-units; `pending` rescales it to the limit's rate.
local function pending(l, st)
  if st.scale == 0 or st.t < 0 or (st.t == 0 and st.f == 0) then return 0, 0 end
  if st.scale == l.L then return st.t, st.f end
  local q1, r1 = muldivmod(st.t, st.scale, l.L)
  local x = r1 + st.f
  local q2 = math.floor(x / l.L)
  return q1 + q2, x - q2 * l.L
end

local function add(q1, r1, q2, r2, m)
  local q, r = q1 + q2, r1 + r2
  if r >= m then r = r - m; q = q + 1 end
  return q, r
end

-- sliding: buckets still counted at now
local function sliding_used(l, st)
  local used = 0
  for _, x in ipairs(st.b) do
    if x[1] + l.W > 0 then used = used + x[2] end
  end
  return used
end

-- when `amount` fits: 0 = now, -1 = never, else {relative instant}
local function admit(l, st, amount)
  if amount > capacity(l) then return -1 end
  if l.algo == 's' then
    local used = sliding_used(l, st)
    local allowed = l.L - amount
    if used <= allowed then return 0 end
    local left = used
    for _, x in ipairs(st.b) do
      if x[1] + l.W > 0 then
        left = left - x[2]
        if left <= allowed then return { x[1] + l.W } end
      end
    end
    return -1
  elseif l.algo == 'g' then
    local pq, pr = pending(l, st)
    local nq, nr = muldivmod(amount, l.W, l.L)
    local cq, cr = muldivmod(l.p, l.W, l.L)
    local q, r = add(pq, pr, nq, nr, l.L)
    if q < cq or (q == cq and r <= cr) then return 0 end
    local wait = q - cq
    if r > cr then wait = wait + 1 end
    return { wait }
  else
    local used = 0
    if 0 < st.we then used = st.used end
    if used <= l.L - amount then return 0 end
    return { st.we }
  end
end

-- take `amount` even past the limit; returns the mark that locates it
local function charge(l, st, amount)
  if l.algo == 's' then
    local g = l.p
    local stale = 0
    for _, x in ipairs(st.b) do
      if x[1] + l.W <= 0 then stale = stale + 1 else break end
    end
    for _ = 1, stale do table.remove(st.b, 1) end
    local o = phase(g)
    local last = st.b[#st.b]
    if last and last[1] >= -o and last[1] < g - o then
      if last[1] < 0 then last[1] = 0 end
      last[2] = last[2] + amount
      return rtext(-o)
    elseif last and last[1] > 0 then
      last[2] = last[2] + amount
      return rtext(last[1] - imod(last[1] + o, g))
    end
    st.b[#st.b + 1] = { 0, amount }
    return rtext(-o)
  elseif l.algo == 'g' then
    local pq, pr = pending(l, st)
    local nq, nr = muldivmod(amount, l.W, l.L)
    st.t, st.f = add(pq, pr, nq, nr, l.L)
    st.scale = l.L
    return ''
  else
    if 0 >= st.we then
      st.we = fixed_end(l, 0)
      st.used = 0
    end
    st.used = st.used + amount
    return rtext(st.we)
  end
end

local function refund(l, st, mark, amount)
  if l.algo == 's' then
    local g, o = l.p, phase(l.p)
    for i, x in ipairs(st.b) do
      if rtext(x[1] - imod(x[1] + o, g)) == mark then
        x[2] = x[2] - amount
        if x[2] <= 0 then table.remove(st.b, i) end
        return
      end
    end
  elseif l.algo == 'g' then
    if st.scale == 0 then return end
    local aq, ar = muldivmod(amount, l.W, st.scale)
    st.t, st.f = st.t - aq, st.f - ar
    if st.f < 0 then st.f = st.f + st.scale; st.t = st.t - 1 end
  else
    if rtext(st.we) == mark then
      st.used = math.max(st.used - amount, 0)
    end
  end
end

-- {used, remaining, reset_at (relative)}
local function level(l, st)
  if l.algo == 's' then
    local used = sliding_used(l, st)
    local reset = 0
    for _, x in ipairs(st.b) do
      if x[1] + l.W > 0 then reset = x[1] + l.W end
    end
    return used, math.max(l.L - used, 0), reset
  elseif l.algo == 'g' then
    local pq, pr = pending(l, st)
    local u1, v1 = muldivmod(pq, l.L, l.W)
    local x = v1 + pr
    local u2 = math.floor(x / l.W)
    local used = u1 + u2
    if x - u2 * l.W > 0 then used = used + 1 end
    local reset = 0
    if st.scale > 0 and (st.t > 0 or (st.t == 0 and st.f > 0)) then
      reset = st.t
      if st.f > 0 then reset = reset + 1 end
    end
    return math.min(used, l.p), math.max(l.p - used, 0), reset
  else
    local used, reset = 0, 0
    if 0 < st.we then used, reset = st.used, st.we else reset = fixed_end(l, 0) end
    return used, math.max(l.L - used, 0), reset
  end
end

-- from when the state is the same as fresh (relative)
local function idle(l, st)
  if l.algo == 's' then
    local last = st.b[#st.b]
    if last then return last[1] + l.W end
    return 0
  elseif l.algo == 'g' then
    return st.t + 1
  end
  return st.we
end

-- state access, cached per call -----------------------------------------------

local states = {}
local dirty = {}
local function state(l)
  local id = l.key .. '\0' .. l.field
  local st = states[id]
  if not st then
    st = load(l, redis.call('HGET', l.key, l.field) or nil)
    states[id] = st
  end
  return st
end
local function touch(l) dirty[l.key .. '\0' .. l.field] = l end
local function flush()
  local ttl = {}
  for id, l in pairs(dirty) do
    local st = states[id]
    redis.call('HSET', l.key, l.field, save(l, st))
    local ms = math.ceil(math.max(idle(l, st), 0) / 1000000) + 1000
    if not ttl[l.key] or ttl[l.key] < ms then ttl[l.key] = ms end
  end
  for key, ms in pairs(ttl) do
    if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
  end
end

local function read_limit(a, i, key)
  return {
    key = key, field = a[i], algo = a[i + 1], W = tonumber(a[i + 2]),
    L = tonumber(a[i + 3]), p = tonumber(a[i + 4]) or 0, mi = tonumber(a[i + 5]),
    metric = a[i + 6], window = a[i + 7], ends = a[i + 8],
  }
end

-- ops ---------------------------------------------------------------------------

local function lease_key_ms(s, n) return s * 1000 + math.floor(n / 1000000) end

-- a plan from ARGV[i..]: `n` subjects, subject `si`'s hash is KEYS[base + si]
local function read_plan(i, n, base)
  local plan = {}
  for si = 1, n do
    local subj = { name = ARGV[i], limits = {} }
    local c = tonumber(ARGV[i + 1])
    i = i + 2
    for _ = 1, c do
      local l = read_limit(ARGV, i, KEYS[base + si])
      l.amount = tonumber(ARGV[i + 9])
      subj.limits[#subj.limits + 1] = l
      i = i + 10
    end
    plan[#plan + 1] = subj
  end
  return plan
end

-- nil when every limit fits, else the refusal reply (the latest admit wins,
-- "never" over any time)
local function refusal(plan)
  local worst, worst_at, worst_i = nil, nil, nil
  local flat = 0
  for _, subj in ipairs(plan) do
    for _, l in ipairs(subj.limits) do
      flat = flat + 1
      if l.amount > 0 then
        local a
        if l.amount > capacity(l) then a = -1 else a = admit(l, state(l), l.amount) end
        if a ~= 0 then
          if worst == nil then worst, worst_i = a, flat; if a ~= -1 then worst_at = a[1] end
          elseif a == -1 and worst ~= -1 then worst, worst_i = -1, flat
          elseif a ~= -1 and worst ~= -1 and a[1] > worst_at then worst, worst_at, worst_i = a, a[1], flat end
        end
      end
    end
  end
  if worst == nil then return nil end
  if worst == -1 then return { 0, NOW_TEXT, worst_i, 'never', '' } end
  return { 0, NOW_TEXT, worst_i, 'at', rtext(worst_at) }
end

-- charge the plan's amounts (when `charging`) and return the reply
-- {1, now, 0, levels...} and, per subject, the items that locate what was
-- held (when `recording`): {key, field, algo, W, L, p, mi, metric, window,
-- ends, subject, amount, mark}
local function take(plan, charging, recording)
  local out = { 1, NOW_TEXT, 0 }
  local items = {}
  for si, subj in ipairs(plan) do
    local its = {}
    local any = false
    for _, l in ipairs(subj.limits) do if l.amount > 0 then any = true end end
    for _, l in ipairs(subj.limits) do
      local st = state(l)
      if charging and l.amount > 0 then
        local mark = charge(l, st, l.amount)
        touch(l)
        if recording then
          its[#its + 1] = { l.key, l.field, l.algo, l.W, l.L, l.p, l.mi, l.metric, l.window, l.ends, subj.name, l.amount, mark }
        end
      elseif charging and any and recording then
        its[#its + 1] = { l.key, l.field, l.algo, l.W, l.L, l.p, l.mi, l.metric, l.window, l.ends, subj.name, 0, '' }
      end
      local used, remaining, reset = level(l, st)
      out[#out + 1] = used; out[#out + 1] = remaining; out[#out + 1] = rtext(reset)
    end
    items[si] = its
  end
  if charging then flush() end
  return out, items
end

-- settle one held item at `actual`; overshoot appended to `out`
local function settle_item(it, actual, out)
  local l = {
    key = it[1], field = it[2], algo = it[3], W = it[4], L = it[5], p = it[6],
    mi = it[7], metric = it[8], window = it[9], ends = it[10],
  }
  local held, mark = it[12], it[13]
  if actual < held then
    if redis.call('HEXISTS', l.key, l.field) == 1 then
      refund(l, state(l), mark, held - actual)
      touch(l)
    end
  elseif actual > held then
    local st = state(l)
    charge(l, st, actual - held)
    touch(l)
    local used = level(l, st)
    if used > l.L then
      out[#out + 1] = it[11]; out[#out + 1] = l.metric; out[#out + 1] = l.window
      out[#out + 1] = l.L; out[#out + 1] = used
    end
  end
end

if op == 'acquire' or op == 'peek' then
  -- ARGV: 3 hold (spend|force|lease), 4 lease ns, 5 owner, 6 meta, 7 subjects,
  -- then per subject: its name, its limit count, per limit 9 spec fields + amount.
  local hold, lease_ns, owner, meta = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
  local plan = read_plan(8, tonumber(ARGV[7]), 4)
  if hold ~= 'force' then
    local r = refusal(plan)
    if r then return r end
  end
  local out, items = take(plan, op == 'acquire', hold == 'lease')
  if op == 'acquire' and hold == 'lease' then
    local flat = {}
    for _, its in ipairs(items) do
      for _, it in ipairs(its) do flat[#flat + 1] = it end
    end
    local id = redis.call('INCR', KEYS[3])
    local es, en = abs(lease_ns)
    redis.call('HSET', KEYS[1], id, cmsgpack.pack({ es, en, owner, meta, flat }))
    redis.call('ZADD', KEYS[2], lease_key_ms(es, en), id)
    out[3] = id
  end
  return out
end

if op == 'settle' then
  -- ARGV: 3 id, 4 owner ("" = any), 5 commit|release, 6.. actual amount per metric index.
  -- -> {'ok', now, meta, overshoot: subject, metric, window, limit, used, ...}
  --  | {'unknown'} | {'expired', meta} | {'was_expired'} (settled by expiry
  --    earlier, remembered for a day) | {'forbidden'}
  local id = ARGV[3]
  local raw = redis.call('HGET', KEYS[1], id)
  if not raw then
    if redis.call('ZSCORE', KEYS[4], id) then return { 'was_expired' } end
    return { 'unknown' }
  end
  local lease = cmsgpack.unpack(raw)
  if ARGV[4] ~= '' and lease[3] ~= ARGV[4] then return { 'forbidden' } end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if rel(lease[1], lease[2]) <= 0 then
    -- settled at its held amounts, which are already counted
    redis.call('ZADD', KEYS[4], lease_key_ms(NS, NN), id)
    return { 'expired', lease[4] }
  end
  local out = { 'ok', NOW_TEXT, lease[4] }
  for _, it in ipairs(lease[5]) do
    local actual = 0
    if ARGV[5] == 'commit' then actual = tonumber(ARGV[6 + it[7]]) end
    settle_item(it, actual, out)
  end
  flush()
  return out
end

if op == 'expire' then
  -- settle every lease that has run out at its held amounts (already counted)
  -- -> {now, then per lease: id, expires_at, meta, item count, per item with
  --     an amount: subject, metric, window, amount}
  local out = { NOW_TEXT }
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', lease_key_ms(NS, NN), 'LIMIT', 0, 1000)
  for _, id in ipairs(due) do
    local raw = redis.call('HGET', KEYS[1], id)
    local lease = raw and cmsgpack.unpack(raw)
    if not lease then
      redis.call('ZREM', KEYS[2], id)
    elseif rel(lease[1], lease[2]) <= 0 then
      redis.call('HDEL', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', KEYS[4], lease_key_ms(NS, NN), id)
      out[#out + 1] = id
      out[#out + 1] = text(lease[1], lease[2])
      out[#out + 1] = lease[4]
      local held = {}
      for _, it in ipairs(lease[5]) do
        if it[12] > 0 then held[#held + 1] = it end
      end
      out[#out + 1] = #held
      for _, it in ipairs(held) do
        out[#out + 1] = it[11]; out[#out + 1] = it[8]; out[#out + 1] = it[9]; out[#out + 1] = it[12]
      end
    end
  end
  -- settled-by-expiry ids are remembered for a day (to answer 409, not 404)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', lease_key_ms(NS, NN) - 86400000)
  return out
end

-- Redis Cluster ------------------------------------------------------------------
-- A script may touch only keys of one slot, so a request whose subjects live
-- in several slots is taken slot by slot (ARCHITECTURE.md, "Redis Cluster"):
-- `c_hold` decides and charges one slot's subjects and leaves, per subject, a
-- marker key `PREFIX{subject}h:ID` (same slot, with a TTL) recording what it
-- took; `c_settle` refunds, charges or finalizes by marker, exactly once
-- (the marker is deleted). Lease records live in registry shards
-- (`PREFIX{leases:N}...`, KEYS 1-4 as above) and are claimed with a token
-- and a timeout before their slots are settled, so a replica that dies
-- mid-settle leaves work the expiry pass finishes, never counts twice.

if op == 'c_hold' then
  -- KEYS: k subject hashes, then (mode 'mark') their k marker keys.
  -- ARGV: 3 mode (peek|spend|force|mark), 4 marker TTL ns, 5 k, then the plan.
  local mode, k = ARGV[3], tonumber(ARGV[5])
  local plan = read_plan(6, k, 0)
  if mode == 'mark' and redis.call('EXISTS', KEYS[k + 1]) == 1 then
    -- a retried call whose first try was applied: already held
    return (take(plan, false, false))
  end
  if mode ~= 'force' then
    local r = refusal(plan)
    if r then return r end
  end
  if mode == 'peek' then return (take(plan, false, false)) end
  local out, items = take(plan, true, mode == 'mark')
  if mode == 'mark' then
    local px = math.max(math.ceil(tonumber(ARGV[4]) / 1000000), 1)
    local acc, order = {}, {}
    for si = 1, k do
      local mk = KEYS[k + si]
      if not acc[mk] then acc[mk] = {}; order[#order + 1] = mk end
      for _, it in ipairs(items[si]) do table.insert(acc[mk], it) end
    end
    for _, mk in ipairs(order) do
      redis.call('SET', mk, cmsgpack.pack(acc[mk]), 'PX', px)
    end
  end
  return out
end

if op == 'c_settle' then
  -- KEYS: k marker keys, then their k subject hashes.
  -- ARGV: 3 commit|release|finalize, 4.. actual amount per metric index.
  -- -> {now, markers found, then for commit: overshoot (subject, metric,
  --     window, limit, used) ...; for finalize: what was held (subject,
  --     metric, window, amount) ...}
  local mode = ARGV[3]
  local out = { NOW_TEXT, 0 }
  for si = 1, #KEYS / 2 do
    local raw = redis.call('GET', KEYS[si])
    if raw then
      redis.call('DEL', KEYS[si])
      out[2] = out[2] + 1
      for _, it in ipairs(cmsgpack.unpack(raw)) do
        if mode == 'finalize' then
          if it[12] > 0 then
            out[#out + 1] = it[11]; out[#out + 1] = it[8]; out[#out + 1] = it[9]; out[#out + 1] = it[12]
          end
        else
          local actual = 0
          if mode == 'commit' then actual = tonumber(ARGV[4 + it[7]]) end
          settle_item(it, actual, out)
        end
      end
    end
  end
  flush()
  return out
end

-- a lease record: {expires s, ns, owner, meta, subject keys (plan order),
-- claim token ('open' while reserving), claim until s, ns}

if op == 'c_open' then
  -- ARGV: 3 lease ns, 4 owner, 5 meta, 6 shard, 7 shard count, 8 opening
  -- claim ns (how long the reserve may take), 9.. subject keys -> {now, id}
  -- The record is claimed by 'open' until the reserve is surely over, so the
  -- expiry pass never finalizes a reservation whose slots are still being
  -- held (settles ignore that claim: nobody has the id before it is over).
  local keys = {}
  for i = 9, #ARGV do keys[#keys + 1] = ARGV[i] end
  local id = string.format('%d', redis.call('INCR', KEYS[3]) * tonumber(ARGV[7]) + tonumber(ARGV[6]))
  local es, en = abs(tonumber(ARGV[3]))
  local cs, cn = abs(tonumber(ARGV[8]))
  redis.call('HSET', KEYS[1], id, cmsgpack.pack({ es, en, ARGV[4], ARGV[5], keys, 'open', cs, cn }))
  redis.call('ZADD', KEYS[2], math.max(lease_key_ms(es, en), lease_key_ms(cs, cn)), id)
  return { NOW_TEXT, id }
end

if op == 'c_claim' then
  -- ARGV: 3 id, 4 owner ("" = any), 5 token, 6 claim ns
  -- -> {'ok', now, meta, keys} (claimed: settle its slots, then c_close)
  --  | {'expired', meta, keys} (ran out: settled at its held amounts; drop
  --    its markers) | {'was_expired'} | {'unknown'} | {'forbidden'}
  --  | {'busy'} (another settle of it is under way)
  local id = ARGV[3]
  local raw = redis.call('HGET', KEYS[1], id)
  if not raw then
    if redis.call('ZSCORE', KEYS[4], id) then return { 'was_expired' } end
    return { 'unknown' }
  end
  local r = cmsgpack.unpack(raw)
  if ARGV[4] ~= '' and r[3] ~= ARGV[4] then return { 'forbidden' } end
  local expired = rel(r[1], r[2]) <= 0
  if r[6] ~= 'open' and r[6] ~= ARGV[5] and rel(r[7], r[8]) > 0 then
    -- claimed by another: an expiry pass reports it, a settle finishes it
    if expired then return { 'was_expired' } end
    return { 'busy' }
  end
  if expired then
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[4], lease_key_ms(NS, NN), id)
    return { 'expired', r[4], r[5] }
  end
  local cs, cn = abs(tonumber(ARGV[6]))
  r[6], r[7], r[8] = ARGV[5], cs, cn
  redis.call('HSET', KEYS[1], id, cmsgpack.pack(r))
  redis.call('ZADD', KEYS[2], math.max(lease_key_ms(r[1], r[2]), lease_key_ms(cs, cn)), id)
  return { 'ok', NOW_TEXT, r[4], r[5] }
end

if op == 'c_close' then
  -- ARGV: 3 id, 4 token ('open' = a refused reservation's), 5 settled|expired
  -- -> 1, or 0 when another has claimed it since (our claim ran out)
  local id = ARGV[3]
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    if cmsgpack.unpack(raw)[6] ~= ARGV[4] then return 0 end
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    if ARGV[5] == 'expired' then redis.call('ZADD', KEYS[4], lease_key_ms(NS, NN), id) end
  end
  return 1
end

if op == 'c_due' then
  -- claim up to 100 records whose lease (or whose settle's claim) ran out
  -- ARGV: 3 token, 4 claim ns -> {now, then per record: id, expires_at, meta, keys}
  local out = { NOW_TEXT }
  local cs, cn = abs(tonumber(ARGV[4]))
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', lease_key_ms(NS, NN), 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    local raw = redis.call('HGET', KEYS[1], id)
    if not raw then
      redis.call('ZREM', KEYS[2], id)
    else
      local r = cmsgpack.unpack(raw)
      r[6], r[7], r[8] = ARGV[3], cs, cn
      redis.call('HSET', KEYS[1], id, cmsgpack.pack(r))
      redis.call('ZADD', KEYS[2], lease_key_ms(cs, cn), id)
      out[#out + 1] = id; out[#out + 1] = text(r[1], r[2]); out[#out + 1] = r[4]; out[#out + 1] = r[5]
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', lease_key_ms(NS, NN) - 86400000)
  return out
end

if op == 'outstanding' then
  return redis.call('HLEN', KEYS[1])
end

return redis.error_reply('sluice: unknown op ' .. tostring(op))
