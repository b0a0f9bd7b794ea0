"""Two processes writing one SQLite database (rollback journal) on a mount, taking turns through
its locks: `python3 bench/sqlite2.py DIR [TRANSACTIONS]`; prints the seconds both took."""
import os
import sqlite3
import sys
import time


def writer(path, n, who):
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t(who, i) VALUES(?, ?)", (who, i))
        db.execute("COMMIT")
    db.close()


if __name__ == "__main__":
    d, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
    path = os.path.join(d, f"two-writers-{os.getpid()}.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(who INTEGER, i INTEGER)")
    db.commit()
    db.close()
    t = time.monotonic()
    pids = []
    for who in range(2):
        pid = os.fork()
        if pid == 0:
            writer(path, n, who)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    took = time.monotonic() - t
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM t").fetchone()[0]
    assert rows == 2 * n, rows
    print(f"{took:.2f} s for {2 * n} transactions of two writers")
