"""Markdown tables for `scripts/bench.sh tasks` (see scripts/bench/tasks.sh).

Usage: tasks_report.py RESULTS.jsonl PROBES.jsonl [LOAD.jsonl]
RESULTS: one line per measured run of one configuration: agentmesh's from
bench/src/tasks_bench.rs ({"system": "agentmesh", "run", "where", "clients",
...}), Ray's from tasks_ray.py ({"system": "ray", "run", "mode", ...}),
and the mesh's own CPU while Ray ran ({"system": "idle", "run", "cores"}).
PROBES: tasks_probe.py's lines (sequential echo and rag tasks).
LOAD: tasks_load.py's lines (the CPU other processes used, second by second).
"""

import json
import statistics
import sys

WHERES = ["host", "region", "cross-region"]


def med(vals):
    return statistics.median(vals)


def cell(vals, fmt):
    return f"{fmt.format(med(vals))} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def verdict_lower(ours, theirs, factor):
    """Latency goal: ours <= factor * theirs. 'ahead' only when our worst run
    beats their best; 'behind' when our best run misses their worst."""
    if max(ours) <= factor * min(theirs):
        return "**met** (ahead: our worst run beats their best)"
    if min(ours) > factor * max(theirs):
        return "**not met** (behind: our best run misses their worst)"
    return "within noise (the runs' ranges overlap)"


def verdict_higher(ours, theirs, factor):
    """Throughput goal: ours >= factor * theirs."""
    if min(ours) >= factor * max(theirs):
        return "**met** (ahead: our worst run beats their best)"
    if max(ours) < factor * min(theirs):
        return "**not met** (behind: our best run misses their worst)"
    return "within noise (the runs' ranges overlap)"


# Other processes using more than this many cores on average during a cell
# make it a shared-machine cell (the report names it).
SHARED = 0.1


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    probes = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
    load = []
    if len(sys.argv) > 3:
        load = [json.loads(line) for line in open(sys.argv[3]) if line.strip()]
    for r in rows:
        if "t0" in r and load:
            # agentmesh's cells: the measured window (after 2 s of warm-up);
            # Ray's: its whole run (start, both modes, shutdown).
            start = r["t0"] + (2 if r["system"] == "agentmesh" else 0)
            inside = [x["foreign"] for x in load if start < x["t"] <= r["t1"] + 0.5]
            r["foreign"] = statistics.mean(inside) if inside else 0.0
    ours = {}
    for r in rows:
        if r["system"] == "agentmesh":
            ours.setdefault((r["where"], r["clients"]), []).append(r)
    ray = {}
    for r in rows:
        if r["system"] == "ray":
            ray.setdefault(r["mode"], []).append(r)
    runs = len({r["run"] for r in rows})

    print(f"Each cell: the median of {runs} runs' values (min–max). Errors: all runs together.")
    print()
    print("| system | submitted to | in flight | p50 ms | p99 ms | tasks/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for where in WHERES:
        for clients in (1, 64):
            rs = ours.get((where, clients), [])
            if rs:
                print(f"| agentmesh | {where} | {clients} | {cell([r['p50_ms'] for r in rs], '{:.2f}')} | "
                      f"{cell([r['p99_ms'] for r in rs], '{:.2f}')} | {cell([r['per_second'] for r in rs], '{:.0f}')} | "
                      f"{sum(r['errors'] for r in rs)} |")
    for mode, label in (("sync", "sync `ray.get`, 1"), ("async", "async actor, 64")):
        rs = ray.get(mode, [])
        if rs:
            what, clients = label.rsplit(", ", 1)
            print(f"| Ray | {what} | {clients} | {cell([r['p50_ms'] for r in rs], '{:.2f}')} | "
                  f"{cell([r['p99_ms'] for r in rs], '{:.2f}')} | {cell([r['per_second'] for r in rs], '{:.0f}')} | "
                  f"{sum(r['errors'] for r in rs)} |")

    if load:
        shared = [r for r in rows if r.get("foreign", 0.0) > SHARED]
        worst = max((r.get("foreign", 0.0) for r in rows if r["system"] != "idle"), default=0.0)
        print()
        if not shared:
            print(f"Other processes on the machine used at most {worst:.2f} of a core on average during any cell.")
        else:
            print(f"Cells during which other processes used more than {SHARED} of a core on average"
                  " (the machine was shared; marked * below):")
            print()
            for r in shared:
                what = r.get("where", r.get("mode"))
                print(f"- run {r['run']}, {r['system']} {what} {r['clients']}: {r['foreign']:.2f} cores")

    failed = [r for rs in ours.values() for r in rs if r["errors"]]
    if failed:
        print()
        print("What the failed tasks got (HTTP status, or timeout/connect/io, by count; the first bodies):")
        print()
        for r in failed:
            print(f"- run {r['run']}, {r['where']}, {r['clients']} in flight: "
                  + ", ".join(f"{k}: {n}" for k, n in r.get("statuses", {}).items()))
            for sample in r.get("error_samples", [])[:2]:
                print(f"  - `{sample[:200]}`")

    sync, asyn = ray.get("sync", []), ray.get("async", [])
    if sync and asyn and ours:
        print()
        print("| goal | agentmesh (median, range) | target from Ray (median, range) | median ratio | verdict |")
        print("|---|---|---|---|---|")
        ray_p50 = [r["p50_ms"] for r in sync]
        host = [r["p50_ms"] for r in ours.get(("host", 1), [])]
        cross = [r["p50_ms"] for r in ours.get(("cross-region", 1), [])]
        if host:
            print(f"| p50 at the host (1 in flight) ≤ ½ Ray's sync call | {cell(host, '{:.2f}')} ms | "
                  f"{cell([p / 2 for p in ray_p50], '{:.2f}')} ms | {med(host) / med(ray_p50):.2f}× Ray's p50 | "
                  f"{verdict_lower(host, ray_p50, 0.5)} |")
        if cross:
            print(f"| cross-region p50 (1 in flight) ≤ Ray's sync call | {cell(cross, '{:.2f}')} ms | "
                  f"{cell(ray_p50, '{:.2f}')} ms | {med(cross) / med(ray_p50):.2f}× | "
                  f"{verdict_lower(cross, ray_p50, 1.0)} |")
        ray_tput = [r["per_second"] for r in asyn]
        for where in WHERES:
            t = [r["per_second"] for r in ours.get((where, 64), [])]
            if t:
                print(f"| tasks/s with 64 in flight ({where}) ≥ 2× Ray's async | {cell(t, '{:.0f}')} /s | "
                      f"{cell([2 * x for x in ray_tput], '{:.0f}')} /s | {med(t) / med(ray_tput):.2f}× Ray's | "
                      f"{verdict_higher(t, ray_tput, 2.0)} |")

    # Run by run: whether either side drifts over the run.
    print()
    print("Run by run (p50 ms with 1 in flight / tasks/s with 64 in flight):")
    print()
    heads = [f"{w}" for w in WHERES] + ["Ray"]
    print("| run | " + " | ".join(heads) + " | mesh CPU while Ray ran |")
    print("|---" * (len(heads) + 2) + "|")
    idle = {r["run"]: r["cores"] for r in rows if r["system"] == "idle"}

    def pair(a, b):
        if not (a and b):
            return "–"
        star = lambda r: "*" if r.get("foreign", 0.0) > SHARED else ""
        return f"{a[0]['p50_ms']:.2f}{star(a[0])} / {b[0]['per_second']:.0f}{star(b[0])}"
    for run in sorted({r["run"] for r in rows}):
        cells = []
        for where in WHERES:
            a = [r for r in ours.get((where, 1), []) if r["run"] == run]
            b = [r for r in ours.get((where, 64), []) if r["run"] == run]
            cells.append(pair(a, b))
        a = [r for r in sync if r["run"] == run]
        b = [r for r in asyn if r["run"] == run]
        cells.append(pair(a, b))
        cpu = f"{idle[run] * 100:.0f} % of a core" if run in idle else "–"
        print(f"| {run} | " + " | ".join(cells) + f" | {cpu} |")

    echo = [p for p in probes if p["agent"] == "echo"]
    if echo:
        print()
        print("Where an echo task's time goes: sequential tasks, one at a time (medians, ms;"
              " `claim` and `record` from the answer's `stages_ms`):")
        print()
        print("| submitted to | tasks | errors | round trip | `claim` (Raft commit) | `record` (chain append) |"
              " the rest (HTTP, routing, forwarding, the synced write of record and result) |")
        print("|---|---|---|---|---|---|---|")
        for where in WHERES:
            ok = [p for p in echo if p["where"] == where and p["status"] == 200]
            bad = [p for p in echo if p["where"] == where and p["status"] != 200]
            if not ok:
                continue
            e2e = [p["e2e_ms"] for p in ok]
            claim = [p["stages_ms"].get("claim", float("nan")) for p in ok]
            record = [p["stages_ms"].get("record", float("nan")) for p in ok]
            rest = [p["e2e_ms"] - p["stages_ms"].get("claim", 0) - p["stages_ms"].get("record", 0) for p in ok]
            print(f"| {where} | {len(ok) + len(bad)} | {len(bad)} | {med(e2e):.2f} | {med(claim):.2f} | "
                  f"{med(record):.3f} | {med(rest):.2f} |")
        errs = {p.get("body", "")[:120] for p in echo if p["status"] != 200}
        for e in sorted(errs):
            print(f"- error seen: `{e}`")

    rag = [p for p in probes if p["agent"] == "docs-rag"]
    if rag:
        print()
        have_stages = any(p.get("stages_ms") for p in rag if p["status"] == 200)
        if not have_stages:
            print("The rag answers carry no `stages_ms`: only the round trip and the host's `millis` are known.")
            print()
        print("A `rag` task (docs-rag over docs-eu, 24 documents) end to end; median ms (min–max) and the"
              " median share of the round trip:")
        print()
        for where in WHERES:
            ok = [p for p in rag if p["where"] == where and p["status"] == 200]
            bad = [p for p in rag if p["where"] == where and p["status"] != 200]
            if not ok and not bad:
                continue
            print(f"Submitted to the {where} node: {len(ok)} tasks, {len(bad)} errors.")
            print()
            if not ok:
                continue
            print("| part | ms | share |")
            print("|---|---|---|")

            def line(name, vals):
                share = [v / p["e2e_ms"] * 100 for v, p in zip(vals, ok)]
                print(f"| {name} | {cell(vals, '{:.1f}')} | {med(share):.1f} % |")

            line("round trip (client)", [p["e2e_ms"] for p in ok])
            line("host run time (`millis`)", [float(p["millis"]) for p in ok])
            if have_stages:
                for stage in ("embed", "search", "generate", "claim", "record"):
                    line(f"`{stage}`", [p["stages_ms"].get(stage, 0.0) for p in ok])
                line("models (embed + generate)",
                     [p["stages_ms"].get("embed", 0.0) + p["stages_ms"].get("generate", 0.0) for p in ok])
                line("mesh (round trip − embed − search − generate)",
                     [p["e2e_ms"] - sum(p["stages_ms"].get(s, 0.0) for s in ("embed", "search", "generate"))
                      for p in ok])
            line("outside the host's run (round trip − `millis`)", [p["e2e_ms"] - p["millis"] for p in ok])
            print()
        errs = {p.get("body", "")[:160] for p in rag if p["status"] != 200}
        for e in sorted(errs):
            print(f"- error seen: `{e}`")


if __name__ == "__main__":
    main()
