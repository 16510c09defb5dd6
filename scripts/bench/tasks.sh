#!/usr/bin/env bash
# Tasks: the `echo` agent's round trip and throughput in a 2-region mesh
# (3 nodes each, loopback), submitted (a) to its host, (b) to another node
# of its region, (c) to a node of the other region; 1 client, then 64
# clients each with one task in flight (bench/src/loadgen.rs, keep-alive,
# a new task id per task). Interleaved with Ray actor calls on this machine
# (scripts/bench/tasks_ray.py: one synchronous call at a time, 64 async
# calls in flight), RUNS runs a side. Then a `rag` task end to end, with
# where its time went (the answer's stages_ms).
# Usage: scripts/bench/tasks.sh AGENTMESH_BIN LOADGEN_BIN RAY_PYTHON [RUNS] [SECONDS]
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
bin=$1 loadgen=$2 ray_python=$3 runs=${4:-5} seconds=${5:-10}
work="$(mktemp -d -t agentmesh-bench-tasks.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
log() { echo "$*" >&2; }

log "starting 3 nodes in eu-west (eu-1 with the models) and 3 in us-east"
apis="$work/apis"
note() { sed -E "s/.*peer_id=([^ ]+) api=([^ ]+).*/$1 \\1 \\2/" <<<"$ready" >>"$apis"; }
start_node "$bin" "$work" eu-1 eu-west "" --models-dir "$AGENTMESH_MODELS_DIR"; note eu-west
seed=$(sed -E 's/.* listen=([^, ]+).*/\1/' <<<"$ready")
for spec in eu-2:eu-west eu-3:eu-west us-1:us-east us-2:us-east us-3:us-east; do
    start_node "$bin" "$work" "${spec%%:*}" "${spec##*:}" "$seed"; note "${spec##*:}"
done
api1=$(awk 'NR==1 {print $3}' "$apis")
for _ in $(seq 200); do
    [ "$("$bin" members --api "$api1" --json | grep -c '"state": "alive"')" -eq 6 ] && break; sleep 0.1
done
"$bin" region bootstrap --region eu-west --voters 3 --api "$api1" >/dev/null
us_api=$(awk '$1=="us-east" {print $3; exit}' "$apis")
"$bin" region bootstrap --region us-east --voters 3 --api "$us_api" >/dev/null
# The bench's own policy in both regions: rate limits far above what it
# sends (every task a client sends is admitted; a 429 counts as an error).
# Without it a region applies the default limits (20 tasks/s per client).
cat >"$work/policy.toml" <<'EOF'
[[residency]]
tag = "pii-eu"
regions = ["eu-west"]

[rate_limits.per_agent]
per_second = 1000000
burst = 1000000

[rate_limits.per_client]
per_second = 1000000
burst = 1000000
EOF
for region_api in eu-west:"$api1" us-east:"$us_api"; do
    for _ in $(seq 50); do
        "$bin" policy apply -f "$work/policy.toml" --region "${region_api%%:*}" --api "${region_api#*:}" >/dev/null 2>&1 && break
        sleep 0.2
    done
done
"$bin" agent deploy -f "$AGENTMESH_ROOT/examples/agents/echo.toml" --region eu-west --api "$api1" >/dev/null
host=""
for _ in $(seq 100); do
    host=$("$bin" agent list --api "$api1" --json | python3 -c 'import json,sys
rows=[a for a in json.load(sys.stdin) if a["name"]=="echo" and a.get("status")=="active"]
print(rows[0]["node"] if rows else "")' 2>/dev/null || true)
    [ -n "$host" ] && break; sleep 0.1
done
[ -n "$host" ] || die "the echo agent was not placed"
host_api=$(awk -v h="$host" '$2==h {print $3}' "$apis")
peer_api=$(awk -v h="$host" '$1=="eu-west" && $2!=h {print $3; exit}' "$apis")
remote_api=$(awk '$1=="us-east" {print $3; exit}' "$apis")
log "echo is on $host; (a) host $host_api, (b) $peer_api in its region, (c) $remote_api in us-east"
echo '{"agent":"echo","input":"hello"}' >"$work/echo.json"
"$bin" task submit --agent echo --input warm --api "$remote_api" >/dev/null

results="$work/results.jsonl"
for run in $(seq "$runs"); do
    for where in host:"$host_api" region:"$peer_api" cross-region:"$remote_api"; do
        for clients in 1 64; do
            line=$("$loadgen" --url "http://${where#*:}/v1/tasks" --method POST --body "$work/echo.json" \
                --clients "$clients" --seconds "$seconds" --warmup 2)
            echo "{\"system\":\"agentmesh\",\"run\":$run,\"where\":\"${where%%:*}\",${line#\{}" >>"$results"
            log "run $run agentmesh ${where%%:*} $clients: $line"
        done
    done
    "$ray_python" "$AGENTMESH_ROOT/scripts/bench/tasks_ray.py" "$seconds" 2 | while read -r line; do
        echo "{\"run\":$run,${line#\{}" >>"$results"
        log "run $run ray: $line"
    done
done

# rag end to end: the documents on eu-1 (which has the models), the agent
# placed there, five questions through a us-east node.
log "rag: putting examples/data/docs-eu.jsonl on eu-1 and deploying docs-rag"
"$bin" data put --dataset docs-eu --file "$AGENTMESH_ROOT/examples/data/docs-eu.jsonl" --api "$api1" >/dev/null
"$bin" agent deploy -f "$AGENTMESH_ROOT/examples/agents/docs-rag.toml" --api "$api1" >/dev/null
rag="$work/rag.jsonl"
for q in "How many days of paid leave do I get?" "When are expense reports due?" \
         "How is sick leave reported?" "How long is parental leave in Germany?" \
         "How often can I work remotely?"; do
    for _ in $(seq 100); do
        start=$(date +%s.%N)
        if out=$("$bin" task submit --agent docs-rag --input "$q" --json --api "$remote_api" 2>/dev/null); then
            end=$(date +%s.%N)
            python3 -c 'import json,sys
a=json.loads(sys.argv[1]); print(json.dumps({"e2e_ms": (float(sys.argv[3])-float(sys.argv[2]))*1000, "host_ms": a["millis"], "stages_ms": a.get("stages_ms", {})}))' \
                "$out" "$start" "$end" >>"$rag"
            break
        fi
        sleep 0.2
    done
done

python3 - "$results" "$rag" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def cell(vals, fmt):
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"
print("| system | submitted to | in flight | p50 ms | p99 ms | tasks/s | errors |")
print("|---|---|---|---|---|---|---|")
groups = {}
for r in rows:
    key = (r.get("system"), r.get("where", r.get("mode")), r["clients"])
    groups.setdefault(key, []).append(r)
for (system, where, clients), rs in groups.items():
    print(f"| {system} | {where} | {clients} | {cell([r['p50_ms'] for r in rs], '{:.2f}')} | "
          f"{cell([r['p99_ms'] for r in rs], '{:.2f}')} | {cell([r['per_second'] for r in rs], '{:.0f}')} | "
          f"{sum(r['errors'] for r in rs)} |")
rag = [json.loads(l) for l in open(sys.argv[2])]
if rag:
    print()
    print(f"rag, {len(rag)} tasks through a us-east node (median ms, range):")
    stages = sorted({k for r in rag for k in r["stages_ms"]})
    for name in ["e2e_ms", "host_ms"]:
        print(f"- {name}: {cell([r[name] for r in rag], '{:.0f}')}")
    for s in stages:
        print(f"- {s}: {cell([r['stages_ms'].get(s, 0.0) for r in rag], '{:.1f}')}")
    models = [r["stages_ms"].get("embed", 0) + r["stages_ms"].get("generate", 0) for r in rag]
    mesh = [r["e2e_ms"] - m for r, m in zip(rag, models)]
    print(f"- models (embed + generate) share of e2e: {cell([m / r['e2e_ms'] * 100 for r, m in zip(rag, models)], '{:.0f}')} %")
    print(f"- the rest (mesh, claim, search, record, CLI): {cell(mesh, '{:.0f}')} ms")
PY
