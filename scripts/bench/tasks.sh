#!/usr/bin/env bash
# Tasks (issue 13): the `echo` agent's round trip and throughput in a
# 2-region mesh (3 nodes each, loopback), submitted (a) to its host, (b) to
# another node of its region, (c) to a node of the other region; 1 client,
# then 64 clients each with one task in flight (bench/src/tasks_bench.rs:
# loadgen's closed loop, keep-alive, POST /v1/tasks without a task id, so
# the node gives each task a new one; failures counted by HTTP status). Interleaved with Ray actor calls on this machine
# (scripts/bench/tasks_ray.py: one synchronous call at a time, 64 async
# calls in flight), RUNS runs a side, SECONDS measured each (after 2 s of
# warm-up). Then sequential echo tasks to see where a task's time goes, and
# a `rag` task end to end with its time by stage (the answer's stages_ms).
# Prints markdown (scripts/bench/tasks_report.py) on stdout, progress on stderr.
# Usage: scripts/bench/tasks.sh AGENTMESH_BIN TASKS_BENCH_BIN RAY_PYTHON [RUNS] [SECONDS]
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
bin=$1 loadgen=$2 ray_python=$3 runs=${4:-5} seconds=${5:-10}
[[ "$runs" =~ ^[0-9]+$ && "$runs" -ge 1 && "$runs" -le 50 ]] || die "RUNS must be 1..50"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 1 && "$seconds" -le 120 ]] || die "SECONDS must be 1..120"
here="$AGENTMESH_ROOT/scripts/bench"
work="$(mktemp -d -t agentmesh-bench-tasks.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "$(date +%T) $*" >&2; }
# Whatever else uses the CPU meanwhile, second by second (the report flags
# the cells it overlapped).
python3 "$here/tasks_load.py" $$ 7200 >"$work/load.jsonl" &
pids+=($!)

# A child in the background, so that cleanup can stop it: run_bg LIMIT CMD...
run_bg() {
    local limit=$1; shift
    timeout --signal=TERM --kill-after=10 "$limit" "$@" &
    local pid=$!
    pids+=("$pid")
    wait "$pid"
}

log "starting 3 nodes in eu-west (eu-1 with the models) and 3 in us-east"
apis="$work/apis"
note() { sed -E "s/.*peer_id=([^ ]+) api=([^ ]+).*/$1 \\1 \\2/" <<<"$ready" >>"$apis"; }
start_node "$bin" "$work" eu-1 eu-west "" --models-dir "$AGENTMESH_MODELS_DIR"; note eu-west
node_pids=("${pids[-1]}")
seed=$(sed -E 's/.* listen=([^, ]+).*/\1/' <<<"$ready")
for spec in eu-2:eu-west eu-3:eu-west us-1:us-east us-2:us-east us-3:us-east; do
    start_node "$bin" "$work" "${spec%%:*}" "${spec##*:}" "$seed"; note "${spec##*:}"
    node_pids+=("${pids[-1]}")
done
api1=$(awk 'NR==1 {print $3}' "$apis")
alive=0
for _ in $(seq 300); do
    alive=$("$bin" members --api "$api1" --json | grep -c '"state": "alive"' || true)
    [ "$alive" -eq 6 ] && break; sleep 0.1
done
[ "$alive" -eq 6 ] || die "the mesh did not converge ($alive of 6 alive)"
us_api=$(awk '$1=="us-east" {print $3; exit}' "$apis")
"$bin" region bootstrap --region eu-west --voters 3 --api "$api1" >/dev/null
"$bin" region bootstrap --region us-east --voters 3 --api "$us_api" >/dev/null
# The bench's own policy, in both regions (a region without one applies
# the default limits, 20 tasks/s per client at its entry nodes): rate
# limits far above what it sends, so every task is admitted (a 429 counts
# as an error), no residency rule on the data used here, and the models
# the rag agent runs.
cat >"$work/policy.toml" <<'TOML'
[[models]]
name = "all-minilm-l6-v2"
sha256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

[[models]]
name = "smollm2-135m-instruct-q4_1"
sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

[rate_limits.per_agent]
per_second = 1000000
burst = 1000000

[rate_limits.per_client]
per_second = 1000000
burst = 1000000
TOML
for region_api in eu-west:"$api1" us-east:"$us_api"; do
    for _ in $(seq 50); do
        "$bin" policy apply -f "$work/policy.toml" --region "${region_api%%:*}" --api "${region_api#*:}" >/dev/null 2>&1 && break
        sleep 0.2
    done
    policy=$("$bin" policy get --region "${region_api%%:*}" --api "${region_api#*:}" --json)
    grep -q 1000000 <<<"$policy" || die "the bench's policy (high rate limits) is not in force in ${region_api%%:*}"
done
"$bin" agent deploy -f "$AGENTMESH_ROOT/examples/agents/echo.toml" --region eu-west --api "$api1" >/dev/null
# placed NAME: the peer id of the node an active agent is on (empty: none yet).
placed() {
    "$bin" agent list --api "$api1" --json | python3 -c 'import json,sys
rows=[a for a in json.load(sys.stdin) if a["name"]==sys.argv[1] and a.get("status")=="active"]
print(rows[0]["node"] if rows else "")' "$1" 2>/dev/null || true
}
host=""
for _ in $(seq 100); do host=$(placed echo); [ -n "$host" ] && break; sleep 0.1; done
[ -n "$host" ] || die "the echo agent was not placed"
host_api=$(awk -v h="$host" '$2==h {print $3}' "$apis")
peer_api=$(awk -v h="$host" '$1=="eu-west" && $2!=h {print $3; exit}' "$apis")
remote_api=$us_api
# The eu-west Raft leader's peer id (every claim is committed through it).
leader() {
    "$bin" region status --region eu-west --api "$api1" --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin).get("leader") or "")' 2>/dev/null || true
}
is_leader() { [ "$1" = "$(leader)" ] && echo "is" || echo "is not"; }
echo_leader=$(is_leader "$host")
log "echo is on $host ($echo_leader eu-west's leader); (a) host $host_api, (b) $peer_api in its region, (c) $remote_api in us-east"
echo '{"agent":"echo","input":"hello"}' >"$work/echo.json"
for api in "$host_api" "$peer_api" "$remote_api"; do
    "$bin" task submit --agent echo --input warm --api "$api" >/dev/null
done

# CPU seconds the mesh's nodes have used so far (utime + stime).
mesh_cpu() {
    local total=0 pid f
    for pid in "${node_pids[@]}"; do
        read -r -a f <"/proc/$pid/stat" || continue
        total=$((total + f[13] + f[14]))
    done
    python3 -c "print($total / $(getconf CLK_TCK))"
}

# Waits (at most 30 s) until the machine is quiet: under a quarter of a
# core busy over one second (the idle mesh uses about 0.05), so that neither
# side's cells start while the other's processes are still winding down
# (Ray's take a few seconds after ray.shutdown()).
settle() {
    local busy
    for _ in $(seq 30); do
        busy=$(python3 -c 'import time
def b():
    f=[int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f)-f[3]-f[4]
import os
a=b(); time.sleep(1); print((b()-a)/os.sysconf("SC_CLK_TCK"))')
        python3 -c "import sys; sys.exit(0 if $busy < 0.25 else 1)" && return 0
    done
    log "the machine did not settle within 30 s ($busy cores busy); going on"
}

results="$work/results.jsonl"
sent=0
for run in $(seq "$runs"); do
    status=$("$bin" region status --region eu-west --api "$api1" --json 2>/dev/null \
        | python3 -c 'import json,sys; s=json.load(sys.stdin); print("log", s.get("last_log_index"), "purged to", s.get("log_purged_up_to"))' 2>/dev/null || true)
    log "run $run of $runs: $sent tasks measured so far; eu-west's raft: $status"
    settle
    for where in host:"$host_api" region:"$peer_api" cross-region:"$remote_api"; do
        for clients in 1 64; do
            t0=$(date +%s.%N)
            run_bg $((seconds + 60)) "$loadgen" --url "http://${where#*:}/v1/tasks" \
                --body "$work/echo.json" --clients "$clients" --seconds "$seconds" --warmup 2 >"$work/line"
            line=$(cat "$work/line")
            echo "{\"system\":\"agentmesh\",\"run\":$run,\"where\":\"${where%%:*}\",\"t0\":$t0,\"t1\":$(date +%s.%N),${line#\{}" >>"$results"
            sent=$((sent + $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$line")))
            log "run $run agentmesh ${where%%:*} $clients: $line"
        done
    done
    settle
    cpu0=$(mesh_cpu) t0=$(date +%s.%N)
    run_bg $((2 * seconds + 180)) "$ray_python" "$here/tasks_ray.py" "$seconds" 2 >"$work/ray.out" 2>"$work/ray.err" \
        || { cat "$work/ray.err" >&2; die "the Ray run failed"; }
    cpu1=$(mesh_cpu) t1=$(date +%s.%N)
    cores=$(python3 -c "print(($cpu1 - $cpu0) / ($t1 - $t0))")
    grep '^{"system": "ray"' "$work/ray.out" | while read -r line; do
        echo "{\"run\":$run,\"t0\":$t0,\"t1\":$t1,${line#\{}" >>"$results"
        log "run $run ray: $line"
    done
    echo "{\"system\":\"idle\",\"run\":$run,\"cores\":$cores}" >>"$results"
    log "run $run: the idle mesh used $cores cores while Ray ran"
done

probes="$work/probes.jsonl"
log "echo: 300 sequential tasks to each node, for the answers' stages_ms"
for where in host:"$host_api" region:"$peer_api" cross-region:"$remote_api"; do
    run_bg 300 python3 "$here/tasks_probe.py" "${where%%:*}" "${where#*:}" echo 300 hello >>"$probes"
done

# rag end to end: the documents on eu-1 (which has the models), the agent
# placed next to them; questions through eu-1 itself and through a us-east node.
log "rag: waiting for eu-1's models, putting examples/data/docs-eu.jsonl on eu-1, deploying docs-rag"
loaded=0
for _ in $(seq 600); do
    loaded=$("$bin" model list --api "$api1" --json | grep -c '"loaded": true' || true)
    [ "$loaded" -eq 2 ] && break; sleep 0.2
done
[ "$loaded" -eq 2 ] || die "eu-1 did not load both models within 120 s"
"$bin" data put --dataset docs-eu --file "$AGENTMESH_ROOT/examples/data/docs-eu.jsonl" --api "$api1" >/dev/null
"$bin" agent deploy -f "$AGENTMESH_ROOT/examples/agents/docs-rag.toml" --api "$api1" >/dev/null
rag_host=""
for _ in $(seq 300); do rag_host=$(placed docs-rag); [ -n "$rag_host" ] && break; sleep 0.1; done
[ -n "$rag_host" ] || die "the docs-rag agent was not placed"
rag_api=$(awk -v h="$rag_host" '$2==h {print $3}' "$apis")
questions=("How many days of paid leave do I get?" "When are expense reports due?"
           "How is sick leave reported?" "How long is parental leave in Germany?"
           "How often can I work remotely?")
# One unmeasured task first (the first generation warms the model's caches).
ok=""
for _ in $(seq 20); do
    "$bin" task submit --agent docs-rag --input "${questions[0]}" --api "$rag_api" >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.5
done
[ -n "$ok" ] || die "the first rag task failed 20 times"
rag_leader=$(is_leader "$rag_host")
log "rag: docs-rag is on $rag_host; 5 questions through it ($rag_api), 5 through us-east ($remote_api)"
run_bg 600 python3 "$here/tasks_probe.py" host "$rag_api" docs-rag 5 "${questions[@]}" >>"$probes"
run_bg 600 python3 "$here/tasks_probe.py" cross-region "$remote_api" docs-rag 5 "${questions[@]}" >>"$probes"

for n in "$work"/*.log; do
    w=$(grep -c ' WARN ' "$n" || true) e=$(grep -c ' ERROR ' "$n" || true)
    [ "$w$e" = 00 ] || log "$(basename "$n"): $w warnings, $e errors; the first: $(grep -m3 -E ' (WARN|ERROR) ' "$n" | cut -c1-300)"
done
echo "Run on $(date -u +%F): $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), $(free -g | awk '/^Mem:/ {print $2}') GiB;" \
    "agentmesh $(git -C "$AGENTMESH_ROOT" describe --always --dirty --abbrev=7) (release), Ray $("$ray_python" -c 'import ray; print(ray.__version__)')" \
    "on $("$ray_python" -c 'import platform; print(platform.python_version())'); $runs runs a side, $seconds s measured each after 2 s of warm-up."
echo
echo "The echo agent's host $echo_leader eu-west's Raft leader (after the echo runs: $(is_leader "$host")); docs-rag's host $rag_leader."
echo
python3 "$here/tasks_report.py" "$results" "$probes" "$work/load.jsonl"
