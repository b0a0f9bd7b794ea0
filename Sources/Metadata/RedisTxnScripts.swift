/// The two server-side scripts of `RedisTxnStore`. Neither knows a file-system rule: `read`
/// runs a batch of read commands atomically (one round trip), `commit` checks that what a
/// transaction read is unchanged and applies its writes, or answers which reads changed.
///
/// A reply is compared in a canonical form: nil `N`, integer `I<n>`, string `S<bytes>`, array
/// `A<count>:` then each element as `<length>:<canonical>`. The client sends `=` and that form
/// when it is short, else its SHA-1 (`RedisTxnStore.expectation`); the commit compares.
package enum RedisTxnScripts {
    /// Shared by both scripts: the canonical form of a reply.
    static let canon = #"""
        local function canon(v)
          if v == false or v == nil then return 'N' end
          local t = type(v)
          if t == 'number' then return 'I' .. string.format('%d', v) end
          if t == 'string' then return 'S' .. v end
          if t == 'table' and v.ok == nil and v.err == nil then
            local parts = {'A', tostring(#v), ':'}
            for i = 1, #v do
              local c = canon(v[i])
              parts[#parts + 1] = tostring(#c)
              parts[#parts + 1] = ':'
              parts[#parts + 1] = c
            end
            return table.concat(parts)
          end
          error('STAGEFS: a reply of unexpected kind')
        end

        """#

    /// ARGV[1] the volume's key prefix, then operations, each answered by one element:
    /// `C cmd keyindex nargs args...` one read command (the list below);
    /// `E keyindex name` an entry of directory hash KEYS[keyindex] and, when it exists, what the
    /// inode it names holds: {entry, attributes, HLEN of its opens, HLEN of its entries}, the
    /// count its type does not have left nil ({nil} when missing; those keys follow from the
    /// entry, under the same hash tag);
    /// `D zkeyindex dkeyindex after limit plus` a page of a directory: {names and positions,
    /// entries, and with `plus` = 1 or 2 the attributes of the inodes they name, and with 1 the
    /// HLEN of their extended attributes too};
    /// `K zkeyindex ino from limit` the indexes of a file's chunks from `from` on (at most
    /// `limit`) with the records of those chunks: {indexes, records}, and from 0 the records of
    /// chunk 0 and the file's attributes after them (from format 5 chunk 0 has no entry in the
    /// index, and its one record may follow the attributes: `chunkIndexes`, `chunk`);
    /// `Q zkeyindex limit budget` the first `limit` pending deletes (members `ino:size`) and,
    /// for the files in order, what `K` gives for as many chunks as the budget has left:
    /// {members, {K reply...}} (the lists stop where the budget does).
    package static let read =
        canon + #"""
            local READ = {GET = true, HGET = true, HLEN = true, HSTRLEN = true, HMGET = true, HKEYS = true, HGETALL = true,
              HRANDFIELD = true, MGET = true, ZRANGE = true, ZRANGEBYSCORE = true, ZREVRANGEBYSCORE = true, ZSCORE = true,
              SCARD = true, SISMEMBER = true, SRANDMEMBER = true, LRANGE = true}
            local P = ARGV[1]
            -- A file's chunk indexes from `from` on (sorted set `z`, at most `limit`) and their records;
            -- from 0, also the records of chunk 0 and the file's attributes (from format 5 chunk 0
            -- has no entry in the index, and its one record may be kept after the attributes).
            local function chunks(z, ino, from, limit)
              local names = redis.call('ZRANGEBYSCORE', z, from, '+inf', 'LIMIT', 0, tonumber(limit))
              local records = {}
              for j = 1, #names do records[j] = redis.call('GET', P .. 'c' .. ino .. '_' .. names[j]) end
              if tonumber(from) == 0 then
                return {names, records, redis.call('GET', P .. 'c' .. ino .. '_0'), redis.call('GET', P .. 'i' .. ino)}
              end
              return {names, records}
            end
            local out = {}
            local i = 2
            while i <= #ARGV do
              local op = ARGV[i]
              if op == 'C' then
                local cmd, k, n = ARGV[i + 1], KEYS[tonumber(ARGV[i + 2])], tonumber(ARGV[i + 3])
                if not READ[cmd] or not k or not n then return redis.error_reply('STAGEFS read: bad operation at ' .. i) end
                local r = redis.call(cmd, k, unpack(ARGV, i + 4, i + 3 + n))
                if cmd == 'HKEYS' then table.sort(r) end
                out[#out + 1] = r
                i = i + 4 + n
              elseif op == 'E' then
                local v = redis.call('HGET', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
                if v then
                  local ino = string.format('%d', struct.unpack('>I8', v))
                  -- (The entry's 9th byte is its type: 2 a directory, which has entries; other
                  -- inodes have opens.)
                  if string.byte(v, 9) == 2 then
                    out[#out + 1] = {v, redis.call('GET', P .. 'i' .. ino), false, redis.call('HLEN', P .. 'd' .. ino)}
                  else
                    out[#out + 1] = {v, redis.call('GET', P .. 'i' .. ino), redis.call('HLEN', P .. 'o' .. ino), false}
                  end
                else
                  out[#out + 1] = {false}
                end
                i = i + 3
              elseif op == 'D' then
                local names = redis.call('ZRANGEBYSCORE', KEYS[tonumber(ARGV[i + 1])], '(' .. ARGV[i + 3], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[i + 4]))
                local ents = {}
                for j = 1, #names, 1000 do
                  local fields = {}
                  for m = j, math.min(#names, j + 999), 2 do fields[#fields + 1] = names[m] end
                  for _, v in ipairs(redis.call('HMGET', KEYS[tonumber(ARGV[i + 2])], unpack(fields))) do ents[#ents + 1] = v end
                end
                local attrs = {}
                local xattrs = {}
                local plus = ARGV[i + 5]
                if plus ~= '0' then
                  -- (The attributes in MGETs of up to 500 keys: one call each costs the server
                  -- less than a GET per entry.)
                  local inos = {}
                  for j = 1, #ents do
                    local v = ents[j]
                    attrs[j] = false
                    if v then inos[j] = string.format('%d', struct.unpack('>I8', v)) end
                  end
                  local batch, at = {}, {}
                  for j = 1, #ents + 1 do
                    if j > #ents or #batch == 500 then
                      if #batch > 0 then
                        local got = redis.call('MGET', unpack(batch))
                        for m = 1, #at do attrs[at[m]] = got[m] end
                      end
                      batch, at = {}, {}
                    end
                    if j <= #ents and inos[j] then
                      batch[#batch + 1] = P .. 'i' .. inos[j]
                      at[#at + 1] = j
                    end
                  end
                  if plus == '1' then
                    for j = 1, #ents do xattrs[j] = inos[j] and redis.call('HLEN', P .. 'x' .. inos[j]) or false end
                  end
                end
                out[#out + 1] = {names, ents, attrs, xattrs}
                i = i + 6
              elseif op == 'K' then
                out[#out + 1] = chunks(KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
                i = i + 5
              elseif op == 'Q' then
                local members = redis.call('ZRANGE', KEYS[tonumber(ARGV[i + 1])], 0, tonumber(ARGV[i + 2]) - 1)
                local lists = {}
                local budget = tonumber(ARGV[i + 3])
                for j = 1, #members do
                  local ino = string.match(members[j], '^(%d+):')
                  if not ino or budget <= 0 then break end
                  lists[j] = chunks(P .. 'k' .. ino, ino, '0', budget)
                  -- (Chunk 0 counts, though from format 5 the index does not name it.)
                  local n = #lists[j][1]
                  if lists[j][1][1] ~= '0' then n = n + 1 end
                  budget = budget - n
                end
                out[#out + 1] = {members, lists}
                i = i + 4
              else
                return redis.error_reply('STAGEFS read: bad operation at ' .. i)
              end
            end
            return out
            """#

    /// KEYS[1] the client's request-id hash, KEYS[2...] every key the transaction read or writes.
    /// ARGV[1] `<slot>:<request number>`, with `:m` after an outside request's (empty: run without a request id), ARGV[2] the number
    /// of checks, then the checks `cmd keyindex nargs args... expected` (a read command and
    /// `=` with the canonical form of its reply when the client read it, or that form's SHA-1),
    /// (`ATMOST keyindex 1 max`, not a Redis command, checks that the counter the key holds is
    /// at most `max`: its reply is 1 or 0), then the writes
    /// `cmd keyindex nargs args...` (none on KEYS[1] but `HSET KEYS[1] r<slot> result`: what an
    /// outside request saves with its id, `RequestRecords`).
    ///
    /// An outside request's id (`RequestRecords`) ends in `:m`: its numbers only grow in a slot.
    ///
    /// Answers {0}: applied; {1}: applied before (the request id is recorded, this is a resend);
    /// {3}: not applied, a later outside request of the slot is recorded;
    /// {2, check, value, ...}: not applied, these checks failed (the value is the reply now for
    /// GET, HGET and HLEN of at most 4 KiB; the check's number is negative when it is left out).
    ///
    /// Everything is validated before the first write (kinds of keys, numbers, arity), so a
    /// refusal or a runtime error leaves nothing half done; `#!lua` makes Redis refuse the whole
    /// script up front when it is out of memory.
    package static let commit =
        "#!lua\n" + canon + #"""
            -- The read commands a check may run, each with the kind of key it reads.
            local CHECK = {GET = 'string', GETRANGE = 'string', HGET = 'hash', HLEN = 'hash', HSTRLEN = 'hash', HKEYS = 'hash', ZRANGE = 'zset',
              ZRANGEBYSCORE = 'zset', ZREVRANGEBYSCORE = 'zset', ZSCORE = 'zset', SCARD = 'set', SISMEMBER = 'set', LRANGE = 'list',
              ATMOST = 'string'}
            local KIND = {SET = 'string', SETRANGE = 'string', DEL = '', APPEND = 'string', INCRBY = 'string', HSET = 'hash',
              HDEL = 'hash', HINCRBY = 'hash', ZADD = 'zset', ZREM = 'zset', RPUSH = 'list', LTRIM = 'list', SADD = 'set', SREM = 'set'}
            local ARITY = {SET = 1, SETRANGE = 2, DEL = 0, APPEND = 1, INCRBY = 1, HSET = 2, HDEL = 1, HINCRBY = 2, ZADD = 2,
              ZREM = 1, RPUSH = 1, LTRIM = 2, SADD = 1, SREM = 1}
            local function refuse(why) return redis.error_reply('STAGEFS commit refused: ' .. why) end
            local function isint(s) return type(s) == 'string' and #s <= 18 and string.match(s, '^%-?%d+$') ~= nil end
            local rq, tag = KEYS[1], ARGV[1]
            local slot, num
            if tag ~= '' then
              local growing
              slot, num, growing = string.match(tag, '^(%d+):(%d+)(:?m?)$')
              if not slot then return refuse('bad request id') end
              local cur = redis.call('HGET', rq, slot)
              if cur == num then return {1} end
              -- An outside request's numbers only grow in a slot: one arriving after a later
              -- one (compared as digit strings: they may pass a double's precision) is stale.
              if growing == ':m' and cur and (#cur > #num or (#cur == #num and cur > num)) then return {3} end
            end
            local nchecks = tonumber(ARGV[2])
            if not nchecks then return refuse('bad number of checks') end
            -- The kind of each key as far as this commit knows it: from a check (a key of
            -- another kind would have stopped the script there), from the read that validates a
            -- write (GET, HGET and STRLEN fail on another kind too), else from TYPE.
            local kinds, deleted, written, writes = {}, {}, {}, {}
            local i = 3
            local failed = {2}
            for c = 1, nchecks do
              local cmd, ki, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
              if not CHECK[cmd] or not ki or not KEYS[ki] or not n or i + 3 + n > #ARGV then return refuse('bad check ' .. c) end
              local r
              if cmd == 'ATMOST' then
                -- Not a command: 1 when the counter is at most the argument, else 0.
                if n ~= 1 or not isint(ARGV[i + 3]) then return refuse('bad check ' .. c) end
                r = ((tonumber(redis.call('GET', KEYS[ki])) or 0) <= tonumber(ARGV[i + 3])) and 1 or 0
              else
                r = redis.call(cmd, KEYS[ki], unpack(ARGV, i + 3, i + 2 + n))
              end
              kinds[KEYS[ki]] = kinds[KEYS[ki]] or CHECK[cmd]
              if cmd == 'HKEYS' then table.sort(r) end
              local want, form = ARGV[i + 3 + n], canon(r)
              local same
              if string.byte(want, 1) == 61 then same = #want == #form + 1 and string.sub(want, 2) == form else same = redis.sha1hex(form) == want end
              if not same then
                if (cmd == 'GET' or cmd == 'HGET' or cmd == 'HLEN') and (type(r) ~= 'string' or #r <= 4096) then
                  failed[#failed + 1] = c
                  failed[#failed + 1] = r
                else
                  failed[#failed + 1] = -c
                  failed[#failed + 1] = false
                end
              end
              i = i + 4 + n
            end
            if #failed > 1 then return failed end
            while i <= #ARGV do
              local cmd, ki, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
              local want = KIND[cmd]
              -- KEYS[1] (the request ids) takes one write: the result saved with this request.
              local saving = ki == 1 and cmd == 'HSET' and slot and ARGV[i + 3] == 'r' .. slot
              if not want or not ki or (ki < 2 and not saving) or not KEYS[ki] or n ~= ARITY[cmd] or i + 2 + n > #ARGV then
                return refuse('bad write at argument ' .. i)
              end
              local k = KEYS[ki]
              if cmd == 'DEL' then
                kinds[k] = 'none'
                deleted[k] = true
              elseif cmd == 'SET' then
                kinds[k] = 'string'
              else
                if cmd == 'INCRBY' then
                  if not isint(ARGV[i + 3]) or written[k] then return refuse('INCRBY ' .. k) end
                  local cur = redis.call('GET', k)
                  if cur and not isint(cur) then return refuse(k .. ' holds no counter') end
                  kinds[k] = kinds[k] or 'string'
                elseif cmd == 'HINCRBY' then
                  if not isint(ARGV[i + 4]) or deleted[k] or written[k .. '\0' .. ARGV[i + 3]] then return refuse('HINCRBY ' .. k) end
                  local cur = redis.call('HGET', k, ARGV[i + 3])
                  if cur and not isint(cur) then return refuse(k .. ' holds no counter in that field') end
                  kinds[k] = kinds[k] or 'hash'
                elseif cmd == 'APPEND' or cmd == 'SETRANGE' then
                  local off = cmd == 'APPEND' and 0 or tonumber(ARGV[i + 3])
                  if cmd == 'SETRANGE' and (not isint(ARGV[i + 3]) or off < 0) then return refuse('SETRANGE ' .. k) end
                  if redis.call('STRLEN', k) + off + #ARGV[i + 2 + n] > 536870912 then return refuse(k .. ' would grow past 512 MiB') end
                  kinds[k] = kinds[k] or 'string'
                elseif cmd == 'ZADD' then
                  if not tonumber(ARGV[i + 3]) then return refuse('ZADD ' .. k .. ': bad score') end
                elseif cmd == 'LTRIM' then
                  if not isint(ARGV[i + 3]) or not isint(ARGV[i + 4]) then return refuse('LTRIM ' .. k) end
                end
                if kinds[k] == nil then kinds[k] = redis.call('TYPE', k).ok end
                if kinds[k] ~= 'none' and kinds[k] ~= want then return refuse(cmd .. ' on ' .. k .. ', which holds a ' .. kinds[k]) end
                kinds[k] = want
                if n == 2 then written[k .. '\0' .. ARGV[i + 3]] = true end
              end
              written[k] = true
              writes[#writes + 1] = i
              i = i + 3 + n
            end
            if i ~= #ARGV + 1 then return refuse('trailing arguments') end
            for _, j in ipairs(writes) do
              redis.call(ARGV[j], KEYS[tonumber(ARGV[j + 1])], unpack(ARGV, j + 3, j + 2 + tonumber(ARGV[j + 2])))
            end
            if slot then
              redis.call('HSET', rq, slot, num)
              redis.call('PEXPIRE', rq, 86400000)
            end
            return {0}
            """#
}
