#!/usr/bin/env python3
"""Failover benchmark (issue 14): SIGKILL the host of a `counter` agent under
load, time until the first task served by its new host, at default settings;
beside it, HashiCorp Serf's failure detection on the same machine, the runs
interleaved.

agentmesh: 3 nodes on 127.0.0.1 (default membership timings: suspect after
2 s, dead after 4 s), one region bootstrapped, a policy with high rate
limits, the `counter` agent deployed and placed. A client submits a counter
task every 50 ms (20 a second) through a node that is not the host, each
retried by id until answered. Each node's JSON log is read as it is written
and each line stamped on arrival with this process's monotonic clock, so the
split is measured from events, not polls:

  detection  SIGKILL -> the first survivor marks the host dead
  placement  SIGKILL -> the leader logs the move of the counter (epoch + 1)
  restore    SIGKILL -> the new host logs the counter active (state restored)
  served     SIGKILL -> the first task answered by the new host

plus, per run, the answered tasks and whether each value 1..n was answered
exactly once (no task lost or counted twice). Serf: 3 agents (its default
`lan` profile), SIGKILL one, until every survivor marks it failed.

With --idle-s N, first an idle check: the same mesh with the counter
placed and no load for N seconds; any suspicion, death or move of the
agent in that time is a false failover.

Usage: failover.py --agentmesh BIN [--runs 10] [--idle-s 600]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from discovery import Agentmesh, Serf, run_once  # noqa: E402

POLICY = ("[rate_limits.per_agent]\nper_second = 1000\nburst = 1000\n\n"
          "[rate_limits.per_client]\nper_second = 1000\nburst = 1000\n")
COUNTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../examples/agents/counter.toml")


class Mesh(Agentmesh):
    """Agentmesh nodes whose APIs and agent events are kept too."""

    def __init__(self, workdir, binary):
        super().__init__(workdir, binary)
        self.apis = []
        self.marks = []  # (t, node index, message, event)

    def on_ready(self, index, line):
        super().on_ready(index, line)
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        self.apis.append(fields["api"])

    def follow(self, index, stream, first_line_event):
        # As Cluster.follow, and the agent events kept with their times.
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if first_line_event is not None and not first_line_event.is_set() and self.is_ready(line):
                self.on_ready(index, line)
                first_line_event.set()
            if '"moved an agent"' in line or '"agent active here' in line:
                t = time.monotonic()
                event = json.loads(line)
                with self.lock:
                    self.marks.append((t, index, event["message"], event))
            parsed = self.parse(line)
            if parsed:
                self.record(index, *parsed)

    def cli(self, *args):
        out = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"agentmesh {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout) if "--json" in args else out.stdout


def submit(api, task_id):
    body = json.dumps({"agent": "counter", "input": "k", "task_id": task_id}).encode()
    req = urllib.request.Request(f"http://{api}/v1/tasks", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def failover_once(binary, log):
    with tempfile.TemporaryDirectory(prefix="agentmesh-failover-") as workdir:
        mesh = Mesh(workdir, binary)
        try:
            for i in range(3):
                mesh.start(i)
            mesh.wait_all_see([0, 1, 2], mesh.names, "alive", 60)
            got = setup(mesh, workdir)
            host = got["node"]
            host_i = mesh.names.index(host)
            entry = mesh.apis[(host_i + 1) % 3]
            answered = []  # (t, task id, value, node)
            stop = threading.Event()

            def client():
                i = 0
                while not stop.is_set():
                    task_id = f"f-{i}"
                    while not stop.is_set():
                        try:
                            a = submit(entry, task_id)
                            answered.append((time.monotonic(), task_id, a["output"]["value"],
                                             a["provenance"]["record"]["node"]))
                            break
                        except Exception:  # retried by id: a retry never runs a task twice
                            time.sleep(0.05)
                    i += 1
                    time.sleep(0.05)

            thread = threading.Thread(target=client, daemon=True)
            thread.start()
            time.sleep(3)
            t_kill = time.monotonic()
            mesh.procs[host_i].send_signal(signal.SIGKILL)
            survivors = [i for i in range(3) if i != host_i]
            deadline = time.monotonic() + 60
            while not any(a[3] != host and a[0] > t_kill for a in list(answered)):
                if time.monotonic() > deadline:
                    raise RuntimeError("no task was served by a new host within 60 s")
                time.sleep(0.01)
            time.sleep(2)
            stop.set()
            thread.join()
            with mesh.lock:
                dead = [t for (t, o, s, k) in mesh.events if s == host and k == "dead" and o in survivors]
                marks = list(mesh.marks)
            served = min(a[0] for a in answered if a[3] != host and a[0] > t_kill)
            moved = [t for (t, i, m, e) in marks if m == "moved an agent" and e.get("agent") == "counter" and t > t_kill]
            active = [t for (t, i, m, e) in marks if m.startswith("agent active here") and e.get("agent") == "counter" and t > t_kill]
            values = sorted(a[2] for a in answered)
            exact = values == list(range(1, len(values) + 1))
            r = {
                "detection": min(dead) - t_kill if dead else None,
                "placement": min(moved) - t_kill if moved else None,
                "restore": min(active) - t_kill if active else None,
                "served": served - t_kill,
                "tasks": len(answered),
                "exact": exact,
            }
            log("  " + ", ".join(f"{k} {v:.3f}s" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
            return r
        finally:
            mesh.stop()


def setup(mesh, workdir):
    """Bootstraps the region, applies the policy, deploys the counter and
    waits until it is active; returns `agent get`."""
    api0 = mesh.apis[0]
    mesh.cli("region", "bootstrap", "--region", "eu-west", "--json", "--api", api0)
    policy = os.path.join(workdir, "policy.toml")
    with open(policy, "w") as f:
        f.write(POLICY)
    deadline = time.monotonic() + 60
    while True:
        try:
            mesh.cli("policy", "apply", "-f", policy, "--region", "eu-west", "--api", api0)
            mesh.cli("agent", "deploy", "-f", COUNTER, "--region", "eu-west", "--json", "--api", api0)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while True:
        got = mesh.cli("agent", "get", "counter", "--region", "eu-west", "--json", "--api", api0)
        if got.get("status") == "active":
            return got
        time.sleep(0.2)


def idle_once(binary, idle_s, log):
    with tempfile.TemporaryDirectory(prefix="agentmesh-idle-") as workdir:
        mesh = Mesh(workdir, binary)
        try:
            for i in range(3):
                mesh.start(i)
            mesh.wait_all_see([0, 1, 2], mesh.names, "alive", 60)
            before = setup(mesh, workdir)
            t0 = time.monotonic()
            log(f"idle for {idle_s} s with the counter on {before['node']} at epoch {before['epoch']}")
            time.sleep(idle_s)
            after = mesh.cli("agent", "get", "counter", "--region", "eu-west", "--json", "--api", mesh.apis[0])
            with mesh.lock:
                suspicions = sum(1 for e in mesh.events if e[0] > t0 and e[3] in ("suspect", "dead"))
                moves = sum(1 for m in mesh.marks if m[0] > t0 and m[2] == "moved an agent")
            return {"suspicions": suspicions, "moves": moves,
                    "same_lease": (after["node"], after["epoch"]) == (before["node"], before["epoch"])}
        finally:
            mesh.stop()


def fmt(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}–{max(xs):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agentmesh", required=True, help="path to the agentmesh binary (release build)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--idle-s", type=int, default=0, help="an idle check of this many seconds first (0: none)")
    args = parser.parse_args()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    idle = idle_once(args.agentmesh, args.idle_s, log) if args.idle_s else None
    mesh_runs, serf_runs = [], []
    for run in range(args.runs):
        log(f"agentmesh failover run {run + 1}/{args.runs}")
        mesh_runs.append(failover_once(args.agentmesh, log))
        log(f"serf detection run {run + 1}/{args.runs}")
        _, detect, _ = run_once(lambda d: Serf(d), 3, 0, log)
        log(f"  death seen by all {detect:.3f}s")
        serf_runs.append(detect)

    col = lambda k: [r[k] for r in mesh_runs]
    print(f"{args.runs} runs each, interleaved, on {os.cpu_count()} cores; median (min–max)\n")
    print("| | detection | placement | restore | first task served by the new host | max |")
    print("|---|---|---|---|---|---|")
    print(f"| agentmesh (3 nodes, defaults) | {fmt(col('detection'))} | {fmt(col('placement'))} | "
          f"{fmt(col('restore'))} | {fmt(col('served'))} | {max(col('served')):.2f} s |")
    print(f"| Serf (3 agents, `lan` defaults), death seen by every survivor | {fmt(serf_runs)} | | | | {max(serf_runs):.2f} s |")
    exact = sum(1 for r in mesh_runs if r["exact"])
    tasks = sum(r["tasks"] for r in mesh_runs)
    if idle:
        print(f"\nIdle {args.idle_s} s: {idle['suspicions']} suspicions or deaths, {idle['moves']} moves, "
              f"lease unchanged: {idle['same_lease']}.")
    print(f"\nCounter exact (every value 1..n answered once) in {exact} of {len(mesh_runs)} runs; {tasks} tasks answered in all.")


if __name__ == "__main__":
    main()
