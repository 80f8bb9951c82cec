-- Fetch only the bytes a batch needs: for each (segment key, step t) the two step records
-- t and t+1, the six frame offsets t..t+5 and the contiguous bytes of frames t..t+4.
-- Layout: see replay_service/codec.py. One call per shard per batch.
-- KEYS: segment keys; ARGV: step index per key, then the record size last.
-- Per item: 0 = missing (evicted meanwhile), -1 = not a valid segment, else
-- {codec id, records, offsets, frames}.
local R = tonumber(ARGV[#ARGV])
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local t = tonumber(ARGV[i])
  local head = redis.call('GETRANGE', key, 0, 31)
  if #head == 0 then
    out[i] = 0
  elseif #head < 32 or string.sub(head, 1, 4) ~= 'CVYS' then
    out[i] = -1
  else
    local _, fmt, codec, n, hlen, roff, toff, foff, total = struct.unpack('<c4BBxxI4I4I4I4I4I4', head)
    if fmt ~= 1 or t == nil or t < 0 or t >= n or roff ~= 32 + hlen or toff ~= roff + (n + 1) * R
        or foff ~= toff + (n + 5) * 4 then
      out[i] = -1
    else
      local rec = redis.call('GETRANGE', key, roff + t * R, roff + (t + 2) * R - 1)
      local tab = redis.call('GETRANGE', key, toff + 4 * t, toff + 4 * (t + 6) - 1)
      if #rec ~= 2 * R or #tab ~= 24 then
        out[i] = -1
      else
        local a = struct.unpack('<I4', tab, 1)
        local b = struct.unpack('<I4', tab, 21)
        if b <= a or foff + b > total then
          out[i] = -1
        else
          out[i] = {codec, rec, tab, redis.call('GETRANGE', key, foff + a, foff + b - 1)}
        end
      end
    end
  end
end
return out
