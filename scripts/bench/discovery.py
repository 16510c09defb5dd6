#!/usr/bin/env python3
"""Discovery and failure-detection benchmark: agentmesh against HashiCorp Serf.

Both systems run N processes on 127.0.0.1, each joining through the first.
Every process's log is read line by line as it is written, and each line is
stamped on arrival with this process's monotonic clock; both systems are
measured from the same kind of event (a member seen alive, seen failed), so
neither pays for a polling loop. Measured:

  (a) from the start of the last node until every node sees all N alive
  (b) from SIGKILL of one node until every survivor marks it dead
  (c) suspicions and deaths of live nodes during an idle period at the
      largest N (false positives), with the CPU the nodes used meanwhile

Usage: discovery.py --agentmesh BIN [--sizes 3,10,30] [--runs 3] [--idle-s 300]
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return 0.0


class Cluster:
    """N processes of one system and the member events their logs report."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []
        self.names = []  # index -> subject name used in events
        self.lock = threading.Lock()
        self.state = {}  # (observer, subject) -> (kind, t)
        self.events = []  # (t, observer, subject, kind)

    def record(self, observer, subject, kind):
        t = time.monotonic()
        with self.lock:
            self.events.append((t, observer, subject, kind))
            # Serf's prober logs "Suspect X has failed" again after X is marked
            # failed: a suspicion never undoes a death.
            if kind == "suspect" and self.state.get((observer, subject), ("",))[0] == "dead":
                return
            self.state[(observer, subject)] = (kind, t)

    def follow(self, index, stream, first_line_event):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if first_line_event is not None and not first_line_event.is_set() and self.is_ready(line):
                self.on_ready(index, line)
                first_line_event.set()
            parsed = self.parse(line)
            if parsed:
                subject, kind = parsed
                self.record(index, subject, kind)

    def spawn(self, index, cmd):
        ready = threading.Event()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        for stream in (proc.stdout, proc.stderr):
            threading.Thread(target=self.follow, args=(index, stream, ready), daemon=True).start()
        if not ready.wait(30):
            proc.kill()
            raise RuntimeError(f"{self.system} node {index} did not start: {cmd}")
        self.procs.append(proc)

    def all_see(self, observers, subjects, kind):
        """Latest time at which every observer saw every subject in `kind`, or None."""
        latest = 0.0
        with self.lock:
            for o in observers:
                for s in subjects:
                    if s == self.names[o]:
                        continue
                    got = self.state.get((o, s))
                    if got is None or got[0] != kind:
                        return None
                    latest = max(latest, got[1])
        return latest

    def wait_all_see(self, observers, subjects, kind, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.all_see(observers, subjects, kind)
            if t is not None:
                return t
            time.sleep(0.005)
        raise RuntimeError(f"{self.system}: not every node saw {kind} within {timeout}s")

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


class Agentmesh(Cluster):
    system = "agentmesh"

    def __init__(self, workdir, binary):
        super().__init__(workdir)
        self.binary = binary
        self.seed = None

    def is_ready(self, line):
        return line.startswith("ready ")

    def on_ready(self, index, line):
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        self.names.append(fields["peer_id"])
        if index == 0:
            self.seed = fields["listen"].split(",")[0]

    def parse(self, line):
        if '"member state changed"' not in line:
            return None
        event = json.loads(line)
        return event["peer"], event["to"]

    def start(self, index):
        cmd = [self.binary, "--log-format", "json", "node", "start",
               "--data-dir", os.path.join(self.workdir, f"n{index}"), "--region", "eu-west",
               "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"]
        if index > 0:
            cmd += ["--bootstrap", self.seed]
        self.spawn(index, cmd)


SERF_EVENTS = [
    (re.compile(r"serf: EventMemberJoin: (\S+)"), "alive"),
    (re.compile(r"memberlist: Suspect (\S+) has failed"), "suspect"),
    (re.compile(r"serf: EventMemberFailed: (\S+)"), "dead"),
    (re.compile(r"serf: EventMemberLeave: (\S+)"), "left"),
]


class Serf(Cluster):
    system = "serf"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.seed = None

    def is_ready(self, line):
        return "Serf agent running!" in line

    def on_ready(self, index, line):
        pass

    def parse(self, line):
        for pattern, kind in SERF_EVENTS:
            m = pattern.search(line)
            if m:
                return m.group(1), kind
        return None

    def start(self, index):
        port = free_port()
        name = f"s{index}"
        self.names.append(name)
        cmd = ["serf", "agent", f"-node={name}", f"-bind=127.0.0.1:{port}",
               f"-rpc-addr=127.0.0.1:{free_port()}", "-log-level=info"]
        if index == 0:
            self.seed = f"127.0.0.1:{port}"
        else:
            cmd.append(f"-join={self.seed}")
        self.spawn(index, cmd)


def run_once(make, n, idle_s, log):
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as workdir:
        cluster = make(workdir)
        try:
            for i in range(n):
                if i == n - 1:
                    t_last = time.monotonic()
                cluster.start(i)
            everyone = list(range(n))
            t_conv = cluster.wait_all_see(everyone, cluster.names, "alive", 60)
            converge = t_conv - t_last

            idle = None
            if idle_s:
                log(f"  {cluster.system} N={n}: idle for {idle_s}s, counting false suspicions and deaths")
                cpu0 = sum(cpu_seconds(p.pid) for p in cluster.procs)
                t0 = time.monotonic()
                time.sleep(idle_s)
                t1 = time.monotonic()
                cpu1 = sum(cpu_seconds(p.pid) for p in cluster.procs)
                with cluster.lock:
                    window = [e for e in cluster.events if t0 <= e[0] <= t1]
                idle = {
                    "suspect": sum(1 for e in window if e[3] == "suspect"),
                    "dead": sum(1 for e in window if e[3] == "dead"),
                    "cpu_per_node_pct": 100 * (cpu1 - cpu0) / (t1 - t0) / n,
                }
                log(f"  idle: {idle['suspect']} false suspicions, {idle['dead']} false deaths, "
                    f"{idle['cpu_per_node_pct']:.2f} % of a core per node")

            victim = n // 2
            t_kill = time.monotonic()
            cluster.procs[victim].send_signal(signal.SIGKILL)
            survivors = [i for i in everyone if i != victim]
            t_dead = cluster.wait_all_see(survivors, [cluster.names[victim]], "dead", 60)
            return converge, t_dead - t_kill, idle
        finally:
            cluster.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agentmesh", required=True, help="path to the agentmesh binary (release build)")
    parser.add_argument("--sizes", default="3,10,30")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-s", type=int, default=300, help="idle period at the largest N (0 to skip)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    systems = [
        ("agentmesh", lambda d: Agentmesh(d, args.agentmesh)),
        ("serf", lambda d: Serf(d)),
    ]
    results = {}
    for n in sizes:
        for name, make in systems:
            for run in range(args.runs):
                idle_s = args.idle_s if (n == max(sizes) and run == 0) else 0
                log(f"{name} N={n} run {run + 1}/{args.runs}")
                converge, detect, idle = run_once(make, n, idle_s, log)
                log(f"  all alive {converge:.3f}s, death seen by all {detect:.3f}s")
                r = results.setdefault((name, n), {"converge": [], "detect": [], "idle": None})
                r["converge"].append(converge)
                r["detect"].append(detect)
                if idle:
                    r["idle"] = idle

    def cell(values):
        return f"{statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})"

    print("| N | system | (a) all N alive after last start | (b) SIGKILL → dead at every survivor |")
    print("|---|---|---|---|")
    for n in sizes:
        for name, _ in systems:
            r = results[(name, n)]
            print(f"| {n} | {name} | {cell(r['converge'])} | {cell(r['detect'])} |")
    print()
    print(f"(c) idle {args.idle_s} s at N = {max(sizes)}:")
    print()
    print("| system | false suspicions | false deaths | CPU per node |")
    print("|---|---|---|---|")
    for name, _ in systems:
        idle = results[(name, max(sizes))]["idle"]
        if idle:
            print(f"| {name} | {idle['suspect']} | {idle['dead']} | {idle['cpu_per_node_pct']:.2f} % of a core |")


if __name__ == "__main__":
    main()
