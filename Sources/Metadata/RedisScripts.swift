/// Lua scripts of the Redis engine: each file-system operation is one `EVALSHA`, so one round
/// trip, atomic on the server. They implement the rules of `TxnMetadata` (the conformance suite
/// runs both engines through the same cases).
///
/// Keys: `i<ino>` packed attributes (see `Attr.encode`), `d<ino>` hash name -> packed (ino, type),
/// `z<ino>` sorted set name -> readdir position, `s<ino>` symlink target, `x<ino>` xattr hash,
/// `c<ino>_<chunk>` slice records, `k<ino>` sorted set of the chunk indexes that have records
/// (so truncation and deletion cost what was written, not the size), `o<ino>` hash session -> opens, `so<sid>` hash ino -> opens,
/// `lk<kind><ino>` lock tables, `sl<sid>` set of "ino:kind", counters, `delfiles`, `delslices`,
/// `sessions`, `sessionInfos`, `setting`.
///
/// Every script gets ARGV[1..5] = uid, gid, groups ("1,2,3"), now seconds, now nanoseconds,
/// and answers a table whose first element is 0 or an errno.
///
/// Scripts that change anything run once per request even when the client sends it again
/// after a lost reply: the client passes KEYS[1] = `rq<client id>` and, as the last ARGV,
/// `<slot>:<request number>` (a slot is held by one request of the client at a time). The
/// outcome is recorded in that hash with the changes, atomically; a request that finds its own
/// number there answers the recorded outcome instead of running again (`withRequestID`).
enum RedisScripts {
    static let prelude = #"""
        local ATTR = '>BI2I4I4I4I8i8I4i8I4i8I4I4I8'
        local ENT = '>I8B'
        local EPERM, ENOENT, EACCES, EEXIST, ENOTDIR, EISDIR, EINVAL = 1, 2, 13, 17, 20, 21, 22
        local EMLINK, ERANGE, ENOTEMPTY, ENODATA, EOPNOTSUPP, ENOSPC, ELOOP = 31, 34, 39, 61, 95, 28, 40
        local EIO, ENAMETOOLONG, EAGAIN = 5, 36, 11
        local band, bor, bnot, rshift = bit.band, bit.bor, bit.bnot, bit.rshift
        local cuid, cgid = tonumber(ARGV[1]), tonumber(ARGV[2])
        local groups = {}
        for g in string.gmatch(ARGV[3], '%d+') do groups[tonumber(g)] = true end
        local nows, nown = tonumber(ARGV[4]), tonumber(ARGV[5])
        local function key(p, n) return p .. string.format('%d', n) end
        local function unpackattr(s)
          local t, mode, uid, gid, nlink, size, as, an, ms, mn, cs, cn, rdev, parent = struct.unpack(ATTR, s)
          return {type=t, mode=mode, uid=uid, gid=gid, nlink=nlink, size=size, as=as, an=an, ms=ms, mn=mn, cs=cs, cn=cn, rdev=rdev, parent=parent}
        end
        local function packattr(a)
          return struct.pack(ATTR, a.type, a.mode, a.uid, a.gid, a.nlink, a.size, a.as, a.an, a.ms, a.mn, a.cs, a.cn, a.rdev, a.parent)
        end
        local function getattr(ino)
          local s = redis.call('GET', key('i', ino))
          if not s then return nil end
          return unpackattr(s)
        end
        local function putattr(ino, a) redis.call('SET', key('i', ino), packattr(a)) end
        local function ingroup(g) return g == cgid or groups[g] == true end
        local function mayaccess(a, mask)
          if mask == 0 then return true end
          if cuid == 0 then
            if band(mask, 1) ~= 0 and a.type ~= 2 and band(a.mode, 73) == 0 then return false end
            return true
          end
          local bits
          if cuid == a.uid then bits = band(rshift(a.mode, 6), 7)
          elseif ingroup(a.gid) then bits = band(rshift(a.mode, 3), 7)
          else bits = band(a.mode, 7) end
          return band(bits, mask) == mask
        end
        local function stickyok(dir, child)
          if band(dir.mode, 512) == 0 or cuid == 0 then return true end
          return cuid == dir.uid or cuid == child.uid
        end
        local function touch(a) a.ms = nows; a.mn = nown; a.cs = nows; a.cn = nown end
        -- Posix.modeAfterWrite / modeAfterChown
        local function modeafterwrite(a)
          if cuid == 0 or a.type ~= 1 then return a.mode end
          local kill = 2048
          if band(a.mode, 1024) ~= 0 and (band(a.mode, 8) ~= 0 or not ingroup(a.gid)) then kill = kill + 1024 end
          return band(a.mode, bnot(kill))
        end
        local function modeafterchown(a)
          if a.type == 2 then return a.mode end
          local kill = 2048
          if band(a.mode, 1024) ~= 0 and (band(a.mode, 8) ~= 0 or (cuid ~= 0 and not ingroup(a.gid))) then kill = kill + 1024 end
          return band(a.mode, bnot(kill))
        end
        local function align4k(n) return math.floor((n + 4095) / 4096) * 4096 end
        local function getentry(parent, name)
          local v = redis.call('HGET', key('d', parent), name)
          if not v then return nil end
          local ino, t = struct.unpack(ENT, v)
          return ino, t
        end
        local function putentry(parent, name, ino, t)
          redis.call('HSET', key('d', parent), name, struct.pack(ENT, ino, t))
          redis.call('ZADD', key('z', parent), redis.call('INCR', 'nextCookie'), name)
        end
        local function delentry(parent, name)
          redis.call('HDEL', key('d', parent), name)
          redis.call('ZREM', key('z', parent), name)
        end
        local function freeinode(ino, a)
          redis.call('DEL', key('i', ino), key('s', ino), key('x', ino))
          if a.type == 1 and a.size > 0 then
            redis.call('ZADD', 'delfiles', nows, string.format('%d:%d', ino, a.size))
          end
          redis.call('DECR', 'usedInodes')
          redis.call('DECRBY', 'usedSpace', align4k(a.size))
        end
        local CHUNKBATCH = 1000
        local function chunkkey(ino, idx) return key('c', ino) .. '_' .. string.format('%d', idx) end
        -- cuts or extends a regular file's chunk records (objects of dropped slices queued),
        -- dropping at most CHUNKBATCH chunks, the highest first (TxnMetadata.truncateStep);
        -- returns false when more remain (the size is then the start of the lowest dropped)
        local function truncate(ino, a, new, csize)
          local old = a.size
          local size = new
          if new < old then
            local first = math.floor((new + csize - 1) / csize)
            local gone = redis.call('ZREVRANGEBYSCORE', key('k', ino), '+inf', first, 'LIMIT', 0, CHUNKBATCH)
            for _, idx in ipairs(gone) do
              local k = chunkkey(ino, tonumber(idx))
              local blob = redis.call('GET', k)
              if blob then
                redis.call('RPUSH', 'delslices', blob)
                redis.call('DEL', k)
              end
              redis.call('ZREM', key('k', ino), idx)
            end
            if #gone == CHUNKBATCH then
              size = math.max(new, tonumber(gone[#gone]) * csize)
            end
            local pos = new % csize
            if size == new and pos ~= 0 then
              local idx = math.floor(new / csize)
              redis.call('APPEND', chunkkey(ino, idx), struct.pack('>I4I8I4I4I4', pos, 0, 0, 0, csize - pos))
              redis.call('ZADD', key('k', ino), idx, idx)
            end
          end
          redis.call('INCRBY', 'usedSpace', align4k(size) - align4k(old))
          a.size = size
          return size == new
        end
        local function isopen(ino) return redis.call('EXISTS', key('o', ino)) == 1 end
        -- drops one link of a non-directory; returns the new attributes and whether it was freed
        local function droplink(ino, a)
          a.nlink = a.nlink - 1
          a.cs = nows; a.cn = nown
          if a.nlink == 0 and not isopen(ino) then
            freeinode(ino, a)
            return a, 1
          end
          putattr(ino, a)
          return a, 0
        end
        -- whether ino is anc or below it; nil when deeper than 4096 levels (TxnMetadata.isWithin)
        local function iswithin(ino, anc)
          for _ = 0, 4096 do
            if ino == anc then return true end
            if ino == 1 then return false end
            local a = getattr(ino)
            if not a then return false end
            ino = a.parent
          end
          return nil
        end
        local function freeifunused(ino)
          local a = getattr(ino)
          if a and a.nlink == 0 and not isopen(ino) then freeinode(ino, a) end
        end
        local function dirof(ino)
          local a = getattr(ino)
          if not a then return nil, ENOENT end
          if a.type ~= 2 then return nil, ENOTDIR end
          return a, 0
        end
        -- the entry `name` of `parent` that the caller may remove: pa, ino, type, attrs or nil, errno
        local function removable(parent, name)
          local pa, err = dirof(parent)
          if not pa then return nil, err end
          if not mayaccess(pa, 3) then return nil, EACCES end
          if #name > 255 then return nil, ENAMETOOLONG end
          local ino, t = getentry(parent, name)
          if not ino then return nil, ENOENT end
          local a = getattr(ino)
          if not a then return nil, ENOENT end
          -- An entry whose type is not its inode's: damaged metadata, not a missing name.
          if t == 2 and a.type ~= 2 or t ~= 2 and a.type == 2 then return nil, EIO end
          return pa, ino, t, a
        end

        """#

    /// ARGV 6 parent, 7 name -> {0, ino, attr}
    static let lookup = #"""
        local parent, name = tonumber(ARGV[6]), ARGV[7]
        local pa, err = dirof(parent)
        if not pa then return {err} end
        if not mayaccess(pa, 1) then return {EACCES} end
        if name == '.' then return {0, parent, packattr(pa)} end
        if #name > 255 then return {ENAMETOOLONG} end
        if name == '..' then
          local p = pa.parent
          if p == 0 then p = 1 end
          local s = redis.call('GET', key('i', p))
          if not s then return {ENOENT} end
          return {0, p, s}
        end
        local ino = getentry(parent, name)
        if not ino then return {ENOENT} end
        local s = redis.call('GET', key('i', ino))
        if not s then return {ENOENT} end
        return {0, ino, s}
        """#

    /// ARGV 6 parent, 7 name, 8 type, 9 mode, 10 rdev, 11 symlink target, 12 session opening it (or 0)
    /// -> {0, ino, attr}
    static let mknod = #"""
        local parent, name, t = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
        local mode, rdev, target = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
        local pa, err = dirof(parent)
        if not pa then return {err} end
        if not mayaccess(pa, 3) then return {EACCES} end
        if pa.nlink == 0 then return {ENOENT} end
        if redis.call('HEXISTS', key('d', parent), name) == 1 then return {EEXIST} end
        local ino = redis.call('INCR', 'nextInode')
        local gid = cgid
        mode = band(mode, 4095)
        if band(pa.mode, 1024) ~= 0 then
          gid = pa.gid
          if t == 2 then mode = bor(mode, 1024)
          elseif band(mode, 1032) == 1032 and cuid ~= 0 and not ingroup(gid) then mode = band(mode, bnot(1024)) end
        end
        local size = 0
        if t == 2 then size = 4096 elseif t == 3 then size = #target end
        local nlink = 1
        if t == 2 then nlink = 2 end
        if t ~= 5 and t ~= 6 then rdev = 0 end
        local pino = 0
        if t == 2 then pino = parent end
        local a = {type=t, mode=mode, uid=cuid, gid=gid, nlink=nlink, size=size, as=nows, an=nown, ms=nows, mn=nown, cs=nows, cn=nown, rdev=rdev, parent=pino}
        putattr(ino, a)
        if t == 3 then redis.call('SET', key('s', ino), target) end
        putentry(parent, name, ino, t)
        touch(pa)
        if t == 2 then pa.nlink = pa.nlink + 1 end
        putattr(parent, pa)
        redis.call('INCR', 'usedInodes')
        redis.call('INCRBY', 'usedSpace', align4k(size))
        if ARGV[12] ~= '0' then
          redis.call('HINCRBY', key('o', ino), ARGV[12], 1)
          redis.call('HINCRBY', 'so' .. ARGV[12], string.format('%d', ino), 1)
        end
        return {0, ino, packattr(a)}
        """#

    /// ARGV 6 parent, 7 name -> {0, ino, attr, freed}
    static let unlink = #"""
        local parent, name = tonumber(ARGV[6]), ARGV[7]
        local pa, ino, t, a = removable(parent, name)
        if not pa then return {ino} end
        if t == 2 then return {EISDIR} end
        if not stickyok(pa, a) then return {EPERM} end
        delentry(parent, name)
        touch(pa)
        putattr(parent, pa)
        local na, freed = droplink(ino, a)
        return {0, ino, packattr(na), freed}
        """#

    /// ARGV 6 parent, 7 name -> {0, ino, attr as left}
    static let rmdir = #"""
        local parent, name = tonumber(ARGV[6]), ARGV[7]
        local pa, ino, t, a = removable(parent, name)
        if not pa then return {ino} end
        if t ~= 2 then return {ENOTDIR} end
        if not stickyok(pa, a) then return {EPERM} end
        if redis.call('HLEN', key('d', ino)) > 0 then return {ENOTEMPTY} end
        delentry(parent, name)
        redis.call('DEL', key('i', ino), key('x', ino), key('d', ino), key('z', ino))
        pa.nlink = pa.nlink - 1
        touch(pa)
        putattr(parent, pa)
        redis.call('DECR', 'usedInodes')
        redis.call('DECRBY', 'usedSpace', align4k(a.size))
        a.nlink = 0
        a.cs, a.cn = nows, nown
        return {0, ino, packattr(a)}
        """#

    /// ARGV 6 src parent, 7 src name, 8 dst parent, 9 dst name, 10 flags
    /// -> {0, removed ino, attr, freed, moved ino, destination's former ino}
    static let rename = #"""
        local sp, sn, dp, dn = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), ARGV[9]
        local exchange, noreplace = band(tonumber(ARGV[10]), 2) ~= 0, band(tonumber(ARGV[10]), 1) ~= 0
        local attrs = {}
        local dirty = {}
        local function load(ino)
          if attrs[ino] == nil then attrs[ino] = getattr(ino) or false end
          return attrs[ino]
        end
        local function mark(ino) dirty[ino] = true end
        local spa, dpa = load(sp), load(dp)
        if not spa or not dpa then return {ENOENT} end
        if spa.type ~= 2 or dpa.type ~= 2 then return {ENOTDIR} end
        if not mayaccess(spa, 3) or not mayaccess(dpa, 3) then return {EACCES} end
        local sino, st = getentry(sp, sn)
        if not sino then return {ENOENT} end
        local sa = load(sino)
        if not sa then return {ENOENT} end
        if not stickyok(spa, sa) then return {EPERM} end
        local dino, dt = getentry(dp, dn)
        if dino then
          if dino == sino then return {0, 0, '', 0, sino, sino} end
          if noreplace then return {EEXIST} end
          local da = load(dino)
          if not da then return {ENOENT} end
          if not stickyok(dpa, da) then return {EPERM} end
          if not exchange then
            if st == 2 and dt ~= 2 then return {ENOTDIR} end
            if st ~= 2 and dt == 2 then return {EISDIR} end
            if dt == 2 and redis.call('HLEN', key('d', dino)) > 0 then return {ENOTEMPTY} end
          elseif dt == 2 and sp ~= dp then
            if not mayaccess(da, 2) then return {EACCES} end
            local w = iswithin(sp, dino)
            if w == nil then return {ELOOP} end
            if w then return {EINVAL} end
          end
        elseif exchange then
          return {ENOENT}
        end
        if st == 2 and sp ~= dp then
          if not mayaccess(sa, 2) then return {EACCES} end
          local w = iswithin(dp, sino)
          if w == nil then return {ELOOP} end
          if w then return {EINVAL} end
        end
        local rino, rattr, rfreed = 0, '', 0
        if exchange then
          putentry(sp, sn, dino, dt)
          putentry(dp, dn, sino, st)
          if sp ~= dp then
            if st == 2 then sa.parent = dp; mark(sino); spa.nlink = spa.nlink - 1; dpa.nlink = dpa.nlink + 1 end
            if dt == 2 then
              local da = load(dino)
              da.parent = sp; dpa.nlink = dpa.nlink - 1; spa.nlink = spa.nlink + 1
            end
          end
          local da = load(dino)
          da.cs = nows; da.cn = nown; mark(dino)
        else
          if dino then
            local da = load(dino)
            if dt == 2 then
              redis.call('DEL', key('i', dino), key('x', dino), key('d', dino), key('z', dino))
              attrs[dino] = false
              dpa.nlink = dpa.nlink - 1
              redis.call('DECR', 'usedInodes')
              redis.call('DECRBY', 'usedSpace', align4k(da.size))
              rino, rattr, rfreed = dino, packattr(da), 1
            else
              local na, freed = droplink(dino, da)
              attrs[dino] = false
              rino, rattr, rfreed = dino, packattr(na), freed
            end
          end
          delentry(sp, sn)
          putentry(dp, dn, sino, st)
          if st == 2 and sp ~= dp then
            sa.parent = dp; spa.nlink = spa.nlink - 1; dpa.nlink = dpa.nlink + 1
          end
        end
        sa.cs = nows; sa.cn = nown; mark(sino)
        touch(spa); mark(sp)
        touch(dpa); mark(dp)
        for ino, _ in pairs(dirty) do
          if attrs[ino] then putattr(ino, attrs[ino]) end
        end
        return {0, rino, rattr, rfreed, sino, dino or 0}
        """#

    /// ARGV 6 ino, 7 parent, 8 name -> {0, attr}
    static let link = #"""
        local ino, parent, name = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
        local pa, err = dirof(parent)
        if not pa then return {err} end
        if not mayaccess(pa, 3) then return {EACCES} end
        local a = getattr(ino)
        if not a then return {ENOENT} end
        if a.type == 2 then return {EPERM} end
        if a.nlink == 0 then return {ENOENT} end
        if a.nlink >= 65000 then return {EMLINK} end
        if redis.call('HEXISTS', key('d', parent), name) == 1 then return {EEXIST} end
        putentry(parent, name, ino, a.type)
        a.nlink = a.nlink + 1
        a.cs = nows; a.cn = nown
        putattr(ino, a)
        touch(pa)
        putattr(parent, pa)
        return {0, packattr(a)}
        """#

    /// ARGV 6 ino, 7 mask, 8 mode, 9 uid, 10 gid, 11 size, 12-17 atime/mtime/ctime (sec, nsec),
    /// 18 via handle (0/1), 19 chunk size -> {0, attr, more}. The rules of `SetAttrRules`;
    /// `more` = 1: a truncate stopped after one bounded step, run the request again.
    static let setattr = #"""
        local ino, mask = tonumber(ARGV[6]), tonumber(ARGV[7])
        local MODE, UID, GID, SIZE, ATIME, MTIME, ATIMENOW, MTIMENOW, CTIME, KILLPRIV = 1, 2, 4, 8, 16, 32, 128, 256, 1024, 1048576
        local viahandle = ARGV[18] == '1'
        local a = getattr(ino)
        if not a then return {ENOENT} end
        local oldmode = a.mode
        local owner = cuid == 0 or cuid == a.uid
        if band(mask, bnot(CTIME)) == 0 then a.mode = modeafterwrite(a) end
        if band(mask, UID + GID) ~= 0 then
          local nu, ng = a.uid, a.gid
          if band(mask, UID) ~= 0 then nu = tonumber(ARGV[9]) end
          if band(mask, GID) ~= 0 then ng = tonumber(ARGV[10]) end
          if cuid ~= 0 then
            if band(mask, UID) ~= 0 and not (cuid == a.uid and nu == a.uid) then return {EPERM} end
            if band(mask, GID) ~= 0 and not (cuid == a.uid and (ingroup(ng) or ng == a.gid)) then return {EPERM} end
          end
          local nm = modeafterchown(a)
          if nm ~= a.mode and not owner then return {EPERM} end
          a.mode = nm
          a.uid, a.gid = nu, ng
        end
        if band(mask, MODE) ~= 0 then
          local m = band(tonumber(ARGV[8]), 4095)
          -- a non-owner may only drop set-user-ID/set-group-ID bits (SetAttrRules)
          if not owner and not (m ~= a.mode and band(m, bnot(a.mode)) == 0 and band(bit.bxor(a.mode, m), bnot(3072)) == 0) then return {EPERM} end
          if cuid ~= 0 and not ingroup(a.gid) then m = band(m, bnot(1024)) end
          a.mode = m
        end
        local touch = false
        if band(mask, SIZE) ~= 0 then
          if a.type == 2 then return {EISDIR} end
          if a.type ~= 1 then return {EINVAL} end
          if not viahandle and not mayaccess(a, 2) then return {EACCES} end
          a.mode = modeafterwrite(a)
          touch = true
        end
        if band(mask, KILLPRIV) ~= 0 then a.mode = modeafterwrite(a) end
        if band(mask, ATIME + MTIME + ATIMENOW + MTIMENOW) ~= 0 then
          local explicit = (band(mask, ATIME) ~= 0 and band(mask, ATIMENOW) == 0) or (band(mask, MTIME) ~= 0 and band(mask, MTIMENOW) == 0)
          if not owner then
            if explicit then return {EPERM} end
            if not mayaccess(a, 2) then return {EACCES} end
          end
          if band(mask, ATIMENOW) ~= 0 then a.as, a.an = nows, nown
          elseif band(mask, ATIME) ~= 0 then a.as, a.an = tonumber(ARGV[12]), tonumber(ARGV[13]) end
          if band(mask, MTIMENOW) ~= 0 then a.ms, a.mn = nows, nown
          elseif band(mask, MTIME) ~= 0 then a.ms, a.mn = tonumber(ARGV[14]), tonumber(ARGV[15]) end
        end
        local more = 0
        if band(mask, SIZE) ~= 0 then
          local new, old = tonumber(ARGV[11]), a.size
          if new ~= old and not truncate(ino, a, new, tonumber(ARGV[19])) then more = 1 end
        end
        if touch and band(mask, MTIME + MTIMENOW) == 0 then a.ms, a.mn = nows, nown end
        if band(mask, CTIME) ~= 0 then a.cs, a.cn = tonumber(ARGV[16]), tonumber(ARGV[17])
        elseif mask == KILLPRIV then
          if a.mode ~= oldmode then a.cs, a.cn = nows, nown end
        else a.cs, a.cn = nows, nown end
        putattr(ino, a)
        return {0, packattr(a), more}
        """#

    /// ARGV 6 ino, 7 after, 8 limit, 9 plus -> {0, name, cookie, entry, [attr], ...}
    static let readdir = #"""
        local ino, limit, plus = tonumber(ARGV[6]), tonumber(ARGV[8]), ARGV[9] == '1'
        local a, err = dirof(ino)
        if not a then return {err} end
        local names = redis.call('ZRANGEBYSCORE', key('z', ino), '(' .. ARGV[7], '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
        local out = {0}
        if #names == 0 then return out end
        local keys = {}
        for i = 1, #names, 2 do keys[#keys + 1] = names[i] end
        local vals = redis.call('HMGET', key('d', ino), unpack(keys))
        for i = 1, #keys do
          local v = vals[i]
          if v then
            local attr = ''
            if plus then
              local cino = struct.unpack(ENT, v)
              attr = redis.call('GET', key('i', cino)) or ''
            end
            if not plus or attr ~= '' then
              out[#out + 1] = keys[i]
              out[#out + 1] = names[2 * i]
              out[#out + 1] = v
              out[#out + 1] = attr
            end
          end
        end
        return out
        """#

    /// Shared xattr namespace rules (mirrors xattrReadCheck/xattrWriteCheck).
    static let xattrRules = #"""
        local function startswith(s, p) return string.sub(s, 1, #p) == p end
        local function xns(name)
          for _, p in ipairs({'user.', 'trusted.', 'security.', 'system.'}) do
            if startswith(name, p) then return p end
          end
          return nil
        end
        local function xhandler(ns, name)
          if ns == nil or ns == 'system.' then return EOPNOTSUPP end
          if #name == #ns then return EINVAL end
          return 0
        end
        local function xread(a, name)
          if #name == 0 or #name > 255 then return ERANGE end
          local ns = xns(name)
          if ns == 'trusted.' then
            if cuid ~= 0 then return ENODATA end
          elseif ns == 'user.' then
            if a.type ~= 1 and a.type ~= 2 then return ENODATA end
            if not mayaccess(a, 4) then return EACCES end
          elseif ns == nil then
            if not mayaccess(a, 4) then return EACCES end
          end
          return xhandler(ns, name)
        end
        local function xwrite(a, name)
          if #name == 0 or #name > 255 then return ERANGE end
          local ns = xns(name)
          if ns == 'trusted.' then
            if cuid ~= 0 then return EPERM end
          elseif ns == 'user.' then
            if a.type ~= 1 and a.type ~= 2 then return EPERM end
            if a.type == 2 and band(a.mode, 512) ~= 0 and cuid ~= 0 and cuid ~= a.uid then return EPERM end
            if not mayaccess(a, 2) then return EACCES end
          elseif ns == nil then
            if not mayaccess(a, 2) then return EACCES end
          end
          if ns == 'security.' and cuid ~= 0 then return EPERM end
          return xhandler(ns, name)
        end

        """#

    /// ARGV 6 ino, 7 name -> {0, value}
    static let getxattr =
        xattrRules + #"""
            local ino, name = tonumber(ARGV[6]), ARGV[7]
            local a = getattr(ino)
            if not a then return {ENOENT} end
            local e = xread(a, name)
            if e ~= 0 then return {e} end
            local v = redis.call('HGET', key('x', ino), name)
            if not v then return {ENODATA} end
            return {0, v}
            """#

    /// ARGV 6 ino -> {0, names...}
    static let listxattr = #"""
        local ino = tonumber(ARGV[6])
        if redis.call('EXISTS', key('i', ino)) == 0 then return {ENOENT} end
        local names = redis.call('HKEYS', key('x', ino))
        table.sort(names)
        local out = {0}
        for _, n in ipairs(names) do
          if cuid == 0 or string.sub(n, 1, 8) ~= 'trusted.' then out[#out + 1] = n end
        end
        return out
        """#

    /// ARGV 6 ino, 7 name, 8 value, 9 flag -> {0}
    static let setxattr =
        xattrRules + #"""
            local ino, name, value, flag = tonumber(ARGV[6]), ARGV[7], ARGV[8], tonumber(ARGV[9])
            local a = getattr(ino)
            if not a then return {ENOENT} end
            local e = xwrite(a, name)
            if e ~= 0 then return {e} end
            local exists = redis.call('HEXISTS', key('x', ino), name) == 1
            if flag == 1 and exists then return {EEXIST} end
            if flag == 2 and not exists then return {ENODATA} end
            if not exists and redis.call('HLEN', key('x', ino)) >= 1024 then return {ENOSPC} end
            redis.call('HSET', key('x', ino), name, value)
            a.cs, a.cn = nows, nown
            putattr(ino, a)
            return {0}
            """#

    /// ARGV 6 ino, 7 name -> {0}
    static let removexattr =
        xattrRules + #"""
            local ino, name = tonumber(ARGV[6]), ARGV[7]
            local a = getattr(ino)
            if not a then return {ENOENT} end
            local e = xwrite(a, name)
            if e ~= 0 then return {e} end
            if redis.call('HDEL', key('x', ino), name) == 0 then return {ENODATA} end
            a.cs, a.cn = nows, nown
            putattr(ino, a)
            return {0}
            """#

    /// ARGV 6 ino, 7 access mask -> {0}
    static let access = #"""
        local a = getattr(tonumber(ARGV[6]))
        if not a then return {ENOENT} end
        if not mayaccess(a, tonumber(ARGV[7])) then return {EACCES} end
        return {0}
        """#

    /// ARGV 6 ino, 7 access mask, 8 sid -> {0, attr, [first chunk's slices for a regular file]}
    static let open = #"""
        local ino, mask, sid = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
        local s = redis.call('GET', key('i', ino))
        if not s then return {ENOENT} end
        local a = unpackattr(s)
        if a.type == 2 and band(mask, 2) ~= 0 then return {EISDIR} end
        if not mayaccess(a, mask) then return {EACCES} end
        redis.call('HINCRBY', key('o', ino), sid, 1)
        redis.call('HINCRBY', 'so' .. sid, string.format('%d', ino), 1)
        if a.type ~= 1 then return {0, s} end
        return {0, s, redis.call('GET', key('c', ino) .. '_0') or ''}
        """#

    /// ARGV 6 ino, 7 sid -> {0}
    static let close = #"""
        local ino, sid = tonumber(ARGV[6]), ARGV[7]
        local n = redis.call('HINCRBY', key('o', ino), sid, -1)
        if n <= 0 then
          redis.call('HDEL', key('o', ino), sid)
          redis.call('HDEL', 'so' .. sid, string.format('%d', ino))
          freeifunused(ino)
        else
          redis.call('HINCRBY', 'so' .. sid, string.format('%d', ino), -1)
        end
        return {0}
        """#

    /// ARGV 6 ino, 7 chunk index, 8 slice record, 9 min size, 10 mtime sec, 11 mtime nsec -> {0, attr}
    static let writeSlice = #"""
        local ino = tonumber(ARGV[6])
        local a = getattr(ino)
        if not a then return {ENOENT} end
        if a.type ~= 1 then return {EINVAL} end
        redis.call('APPEND', key('c', ino) .. '_' .. ARGV[7], ARGV[8])
        redis.call('ZADD', key('k', ino), ARGV[7], ARGV[7])
        local minsize = tonumber(ARGV[9])
        if minsize > a.size then
          redis.call('INCRBY', 'usedSpace', align4k(minsize) - align4k(a.size))
          a.size = minsize
        end
        a.ms, a.mn = tonumber(ARGV[10]), tonumber(ARGV[11])
        if a.cs < a.ms or (a.cs == a.ms and a.cn < a.mn) then a.cs, a.cn = a.ms, a.mn end
        putattr(ino, a)
        return {0, packattr(a)}
        """#

    /// ARGV 6 ino, 7 size -> {0, slices, done}: drops at most CHUNKBATCH chunks of a deleted
    /// file; once none is left, its index and its queue entry go too.
    static let finishDelete = #"""
        local ino = tonumber(ARGV[6])
        local idxs = redis.call('ZRANGE', key('k', ino), 0, CHUNKBATCH - 1)
        local out = {}
        for _, idx in ipairs(idxs) do
          local k = chunkkey(ino, tonumber(idx))
          local blob = redis.call('GET', k)
          if blob then
            out[#out + 1] = blob
            redis.call('DEL', k)
          end
        end
        if #idxs > 0 then redis.call('ZREMRANGEBYRANK', key('k', ino), 0, #idxs - 1) end
        if #idxs == CHUNKBATCH then return {0, table.concat(out), 0} end
        redis.call('DEL', key('k', ino))
        redis.call('ZREM', 'delfiles', string.format('%d:%s', ino, ARGV[7]))
        return {0, table.concat(out), 1}
        """#

    /// ARGV 6 limit -> {0, slices}
    static let takeDropped = #"""
        local out = {}
        for i = 1, tonumber(ARGV[6]) do
          local b = redis.call('LPOP', 'delslices')
          if not b then break end
          out[#out + 1] = b
        end
        return {0, table.concat(out)}
        """#

    /// ARGV 6 sid, 7 scan cursor of its opens -> {0, next cursor}: drops a bounded batch of
    /// the session's opens (freeing unlinked files) and locks. Run again with the cursor it
    /// gives until that is "done": then the session is gone.
    static let closeSession = #"""
        local sid = ARGV[6]
        local cursor = ARGV[7]
        if cursor ~= 'locks' then
          local r = redis.call('HSCAN', 'so' .. sid, cursor, 'COUNT', CHUNKBATCH)
          local fields = r[2]
          for i = 1, #fields, 2 do
            local ino = tonumber(fields[i])
            redis.call('HDEL', key('o', ino), sid)
            redis.call('HDEL', 'so' .. sid, fields[i])
            freeifunused(ino)
          end
          if r[1] ~= '0' then return {0, r[1]} end
        end
        local prefix = struct.pack('>I8', tonumber(sid))
        local members = redis.call('SPOP', 'sl' .. sid, CHUNKBATCH)
        for _, m in ipairs(members) do
          local ino, kind = string.match(m, '^(%d+):(%d+)$')
          local k = 'lk' .. string.char(tonumber(kind)) .. ino
          local tbl = redis.call('GET', k)
          if tbl then
            local kept = {}
            for p = 1, #tbl, 37 do
              local rec = string.sub(tbl, p, p + 36)
              if string.sub(rec, 1, 8) ~= prefix then kept[#kept + 1] = rec end
            end
            if #kept == 0 then redis.call('DEL', k) else redis.call('SET', k, table.concat(kept)) end
          end
        end
        if #members == CHUNKBATCH then return {0, 'locks'} end
        redis.call('DEL', 'so' .. sid, 'sl' .. sid)
        redis.call('ZREM', 'sessions', sid)
        redis.call('HDEL', 'sessionInfos', sid)
        return {0, 'done'}
        """#

    /// ARGV 6 format record, 7 root mode -> {0}: writes it and creates the root directory when missing.
    /// ARGV 6 format record, 7 root mode, 8 the record the client checked ('' for none): a
    /// record changed since is answered EAGAIN and the client checks again.
    static let initialize = #"""
        if (redis.call('GET', 'setting') or '') ~= ARGV[8] then return {EAGAIN} end
        redis.call('SET', 'setting', ARGV[6])
        if redis.call('EXISTS', 'i1') == 0 then
          putattr(1, {type=2, mode=tonumber(ARGV[7]), uid=0, gid=0, nlink=2, size=4096, as=nows, an=nown, ms=nows, mn=nown, cs=nows, cn=nown, rdev=0, parent=1})
          if tonumber(redis.call('GET', 'nextInode') or '0') < 1 then redis.call('SET', 'nextInode', 1) end
          redis.call('INCR', 'usedInodes')
          redis.call('INCRBY', 'usedSpace', 4096)
        end
        return {0}
        """#

    /// ARGV 6 session info (JSON) -> {0, sid}
    static let newSession = #"""
        local sid = redis.call('INCR', 'nextSession')
        redis.call('ZADD', 'sessions', nows, sid)
        redis.call('HSET', 'sessionInfos', sid, ARGV[6])
        return {0, sid}
        """#

    /// Scripts that change metadata (run with a request id); the others only read.
    static let mutating: Set<String> = [
        "mknod", "unlink", "rmdir", "rename", "link", "setattr", "setxattr", "removexattr", "open", "close", "writeSlice",
        "finishDelete", "takeDropped", "closeSession", "initialize", "newSession",
    ]

    /// Runs `body` once per request id (see the type's documentation).
    static func withRequestID(_ body: String) -> String {
        """
        local function body()
        \(body)
        end
        local rqkey, rqslot, rqnum = KEYS[1], nil, nil
        if rqkey then
          local tag = ARGV[#ARGV]
          local colon = string.find(tag, ':', 1, true)
          rqslot, rqnum = string.sub(tag, 1, colon - 1), string.sub(tag, colon + 1)
          local prev = redis.call('HGET', rqkey, rqslot)
          if prev then
            local sep = string.find(prev, ':', 1, true)
            if string.sub(prev, 1, sep - 1) == rqnum then return cmsgpack.unpack(string.sub(prev, sep + 1)) end
          end
        end
        local result = body()
        if rqkey then
          redis.call('HSET', rqkey, rqslot, rqnum .. ':' .. cmsgpack.pack(result))
          redis.call('PEXPIRE', rqkey, 86400000)
        end
        return result
        """
    }

    /// The full text of script `name` as loaded into Redis.
    static func text(_ name: String) -> String {
        let body = all.first { $0.0 == name }!.1
        return prelude + (mutating.contains(name) ? withRequestID(body) : body)
    }

    /// Every script by name, for loading.
    static let all: [(String, String)] = [
        ("lookup", lookup), ("mknod", mknod), ("unlink", unlink), ("rmdir", rmdir), ("rename", rename),
        ("link", link), ("setattr", setattr), ("readdir", readdir), ("getxattr", getxattr),
        ("listxattr", listxattr), ("setxattr", setxattr), ("removexattr", removexattr), ("access", access),
        ("open", open), ("close", close), ("writeSlice", writeSlice), ("finishDelete", finishDelete),
        ("takeDropped", takeDropped), ("closeSession", closeSession), ("initialize", initialize), ("newSession", newSession),
    ]
}
