-- Insert one segment and evict the oldest ones past capacity, in one atomic step, so a
-- reader never sees a half-inserted or half-evicted shard.
-- KEYS: next_seq, head_seq, size, bytes, lens (hash seq -> T), inserted_total, evicted_total,
--       epoch, sampled_total
-- ARGV: blob, T, capacity, segment key prefix, epoch to adopt if the shard has none yet
-- The epoch is part of every segment key: a shard that restarts empty gets a new one, so a
-- reader's mirror of the old shard can never alias the new shard's segments.
-- Returns {seq, size, evicted, inserted_total, sampled_total, epoch}.
-- Bad arguments (a bug or a foreign client) are refused with an error before anything is written.
local function bad(what)
  return redis.error_reply('ERR convoy insert: ' .. what)
end
if #KEYS ~= 9 then return bad('expected 9 keys, got ' .. #KEYS) end
if #ARGV ~= 5 then return bad('expected 5 arguments, got ' .. #ARGV) end
local blob, t, cap, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if #blob == 0 then return bad('empty segment') end
if not t or t ~= math.floor(t) or t < 1 or t > 1000000 then
  return bad('transition count must be an integer in [1, 1000000], got ' .. tostring(ARGV[2]))
end
if not cap or cap ~= math.floor(cap) or cap < 1 then
  return bad('capacity must be an integer >= 1, got ' .. tostring(ARGV[3]))
end
if #prefix == 0 or #prefix > 64 then return bad('bad key prefix') end
if not string.match(ARGV[5], '^%x+$') or #ARGV[5] > 64 then
  return bad('epoch must be 1-64 hex digits')
end
local epoch = redis.call('GET', KEYS[8])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[8], epoch)
end
prefix = prefix .. epoch .. ':'
local seq = redis.call('INCR', KEYS[1])
redis.call('SET', prefix .. seq, blob)
redis.call('HSET', KEYS[5], seq, t)
local size = redis.call('INCRBY', KEYS[3], t)
redis.call('INCRBY', KEYS[4], #blob)
local inserted = redis.call('INCRBY', KEYS[6], t)
local head = tonumber(redis.call('GET', KEYS[2]) or seq)
local evicted = 0
-- FIFO: drop whole segments from the head; never the one just written.
while size > cap and head < seq do
  local key = prefix .. head
  local n = tonumber(redis.call('HGET', KEYS[5], head) or 0)
  redis.call('DECRBY', KEYS[4], redis.call('STRLEN', key))
  redis.call('DEL', key)
  redis.call('HDEL', KEYS[5], head)
  size = redis.call('DECRBY', KEYS[3], n)
  evicted = evicted + n
  head = head + 1
end
redis.call('SET', KEYS[2], head)
if evicted > 0 then redis.call('INCRBY', KEYS[7], evicted) end
local sampled = tonumber(redis.call('GET', KEYS[9]) or 0)
return {seq, size, evicted, inserted, sampled, epoch}
