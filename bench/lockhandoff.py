"""How long a blocked lock waiter takes to get the lock after its holder lets it go, on one mount
(two processes, as two SQLite writers on one node): `python3 bench/lockhandoff.py DIR [ROUNDS]`.
Prints the median and the spread in milliseconds, for fcntl (F_SETLKW) and flock."""
import fcntl
import os
import statistics
import sys
import time


def rounds(path, n, kind):
    out = []
    for _ in range(n):
        r, w = os.pipe()
        holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        lock = (lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX)) if kind == "fcntl" else (lambda fd: fcntl.flock(fd, fcntl.LOCK_EX))
        unlock = (lambda fd: fcntl.lockf(fd, fcntl.LOCK_UN)) if kind == "fcntl" else (lambda fd: fcntl.flock(fd, fcntl.LOCK_UN))
        lock(holder)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            fd = os.open(path, os.O_RDWR)
            lock(fd)  # blocks until the parent lets go
            os.write(w, str(time.monotonic()).encode())
            os._exit(0)
        os.close(w)
        time.sleep(0.05)  # the child is waiting by now
        released = time.monotonic()
        unlock(holder)
        got = float(os.read(r, 64).decode())
        os.waitpid(pid, 0)
        os.close(r)
        os.close(holder)
        out.append((got - released) * 1000)
    return out


if __name__ == "__main__":
    d, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    for kind in ("fcntl", "flock"):
        ms = rounds(os.path.join(d, f"lockhandoff-{kind}"), n, kind)
        print(f"{kind}: median {statistics.median(ms):.2f} ms (min {min(ms):.2f}, max {max(ms):.2f}) over {n}")
