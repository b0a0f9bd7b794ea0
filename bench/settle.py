"""Waits until the machine is idle (under 10% of its CPU busy over one second; at most 60 s), so
that one run does not pay for what the run before it left behind: a file system that deletes in
the background (both do) is still at work right after its unlink round ends, and the dirty pages
a run left (JuiceFS's file bucket never flushes its blocks) are written out first (`sync`), or
the next run's fsyncs would wait behind them. Run as a script (bench/settle.sh) or imported
(bench/suite.py)."""
import os
import time


def settle():
    os.sync()
    def snap():
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(v), v[3] + v[4]
    deadline = time.time() + 60
    while time.time() < deadline:
        t0, i0 = snap()
        time.sleep(1)
        t1, i1 = snap()
        if (i1 - i0) / max(1, t1 - t0) > 0.9:
            return


if __name__ == "__main__":
    settle()
