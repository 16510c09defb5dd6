"""The CPU that processes other than the bench's own use, second by second,
for `scripts/bench.sh tasks`: a benchmark on a shared machine says which of
its cells ran while something else was busy.

Every second: the machine's busy CPU (/proc/stat: user, nice and system
time; interrupts are left out) less the CPU of ROOT_PID
and its descendants (the bench, its nodes, its load generators, Ray's
processes), in cores. Prints one JSON line per second: {"t": unix seconds,
"total": cores busy, "foreign": cores busy outside the bench}. Stops when
ROOT_PID ends or after LIMIT seconds.
Usage: tasks_load.py ROOT_PID LIMIT_SECONDS
"""

import json
import os
import sys
import time

TCK = os.sysconf("SC_CLK_TCK")


def snapshot():
    """(pid -> (ppid, utime + stime ticks)), busy ticks of the machine."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        procs[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user + nice + system: what processes use (irq and softirq time, much
    # of it loopback networking, belongs to no process).
    return procs, cpu[0] + cpu[1] + cpu[2]


def descendants(procs, root):
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, stack = set(), [root]
    while stack:
        pid = stack.pop()
        seen.add(pid)
        stack.extend(children.get(pid, []))
    return seen


def main():
    root, limit = int(sys.argv[1]), float(sys.argv[2])
    start = time.time()
    before, busy0 = snapshot()
    t0 = time.time()
    while time.time() - start < limit and os.path.exists(f"/proc/{root}"):
        time.sleep(1)
        now, busy1 = snapshot()
        t1 = time.time()
        ours = descendants(now, root)
        # A process of ours that started in this second counts in full.
        mine = sum(ticks - (before[pid][1] if pid in before else 0)
                   for pid, (_, ticks) in now.items() if pid in ours)
        total = (busy1 - busy0) / TCK / (t1 - t0)
        print(json.dumps({"t": round(t1, 3), "total": round(total, 3),
                          "foreign": round(max(0.0, total - mine / TCK / (t1 - t0)), 3)}), flush=True)
        before, busy0, t0 = now, busy1, t1


if __name__ == "__main__":
    main()
