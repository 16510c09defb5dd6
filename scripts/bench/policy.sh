#!/usr/bin/env bash
# Policy writes: a 3-node agentmesh region against a 3-member etcd 3.4
# cluster, both on loopback with fsync on, both driven by the same load
# generator (bench/src/loadgen.rs): 1 client, then 64 concurrent clients,
# 256-byte values, keep-alive, each client one request in flight.
# Also measures the machine's floors: fdatasync and loopback round trip.
# Usage: scripts/bench/policy.sh AGENTMESH_BIN LOADGEN_BIN [SECONDS]
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
bin=$1 loadgen=$2 seconds=${3:-10}
work="$(mktemp -d -t agentmesh-bench-policy.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
log() { echo "$*" >&2; }

log "floors: fdatasync of a 256-byte append, 64-byte loopback TCP ping-pong"
floors=$(python3 - "$work" <<'PY'
import os, socket, statistics, sys, threading, time
d = sys.argv[1]
fd = os.open(os.path.join(d, "fsync-probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
lat = []
for _ in range(500):
    t = time.perf_counter(); os.write(fd, b"x" * 256); os.fdatasync(fd); lat.append(time.perf_counter() - t)
lat.sort()
fs = (lat[len(lat)//2] * 1e3, lat[int(len(lat)*.99)] * 1e3)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def echo():
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(64)
        if not b: return
        c.sendall(b)
threading.Thread(target=echo, daemon=True).start()
cl = socket.create_connection(srv.getsockname()); cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rt = []
for _ in range(5000):
    t = time.perf_counter(); cl.sendall(b"y" * 64); n = 0
    while n < 64: n += len(cl.recv(64 - n))
    rt.append(time.perf_counter() - t)
rt.sort()
print(f"{fs[0]:.3f} {fs[1]:.3f} {rt[len(rt)//2]*1e6:.0f} {rt[int(len(rt)*.99)]*1e6:.0f}")
PY
)
read -r fsync_p50 fsync_p99 rtt_p50 rtt_p99 <<<"$floors"

# 256 bytes of JSON: a policy for agentmesh, a put for etcd with a 256-byte value.
python3 - "$work" <<'PY'
import base64, json, sys
d = sys.argv[1]
policy = {"residency": [{"tag": "pii-eu", "regions": ["eu-west"]}, {"tag": "t" * 90, "regions": ["eu-west", "us-east"]}],
          "models": [], "rate_limits": {"per_agent": {"per_second": 100, "burst": 200}, "per_client": {"per_second": 20, "burst": 40}}}
body = json.dumps(policy, separators=(",", ":"))
pad = 256 - len(body)
policy["residency"][1]["tag"] += "t" * pad
open(f"{d}/policy.json", "w").write(json.dumps(policy, separators=(",", ":")))
open(f"{d}/etcd.json", "w").write(json.dumps({"key": base64.b64encode(b"policy/eu-west").decode(),
                                              "value": base64.b64encode(b"v" * 256).decode()}))
PY
log "agentmesh policy body: $(wc -c <"$work/policy.json") bytes; etcd value: 256 bytes"

run_load() { # URL METHOD BODY CLIENTS
    "$loadgen" --url "$1" --method "$2" --body "$3" --clients "$4" --seconds "$seconds" --warmup 2
}

# --- agentmesh: three nodes of one region, default settings (every log append fsynced).
log "starting a 3-node agentmesh region"
# Each node's peer id and API address, from its ready line (nodes do not
# advertise their API: see --advertise-api).
apis="$work/apis"
note_api() { sed -E 's/.*peer_id=([^ ]+) api=([^ ]+).*/\1 \2/' <<<"$ready" >>"$apis"; }
start_node "$bin" "$work" a eu-west; note_api; seed=$(sed -E 's/.* listen=([^, ]+).*/\1/' <<<"$ready"); api=$(sed -E 's/.* api=([^ ]+).*/\1/' <<<"$ready")
start_node "$bin" "$work" b eu-west "$seed"; note_api; start_node "$bin" "$work" c eu-west "$seed"; note_api
for _ in $(seq 100); do
    [ "$("$bin" members --api "$api" --json | grep -c '"state": "alive"')" -eq 3 ] && break; sleep 0.1
done
"$bin" region bootstrap --region eu-west --voters 3 --api "$api" >&2
leader_api=$("$bin" region status --region eu-west --json --api "$api" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["leader"])')
leader_api=$(awk -v p="$leader_api" '$1 == p { print $2 }' "$apis")
log "agentmesh leader API: $leader_api"
am1=$(run_load "http://$leader_api/v1/regions/eu-west/policy" PUT "$work/policy.json" 1)
am64=$(run_load "http://$leader_api/v1/regions/eu-west/policy" PUT "$work/policy.json" 64)
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
pids=()

# --- etcd: three members, default settings (fsync on).
log "starting a 3-member etcd cluster"
cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$work/etcd$i" \
        --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
        --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token bench \
        >"$work/etcd$i.log" 2>&1 &
    pids+=($!)
done
etcd_leader=""
for _ in $(seq 100); do
    for i in 1 2 3; do
        s=$(curl -sf -X POST "http://127.0.0.1:2379$i/v3/maintenance/status" -d '{}' || true)
        if [ -n "$s" ] && python3 -c "import json,sys; s=json.loads(sys.argv[1]); sys.exit(0 if s.get('leader') and s['leader']==s['header']['member_id'] else 1)" "$s"; then
            etcd_leader="127.0.0.1:2379$i"
        fi
    done
    [ -n "$etcd_leader" ] && break
    sleep 0.2
done
[ -n "$etcd_leader" ] || { log "etcd elected no leader"; exit 1; }
log "etcd leader client URL: $etcd_leader"
et1=$(run_load "http://$etcd_leader/v3/kv/put" POST "$work/etcd.json" 1)
et64=$(run_load "http://$etcd_leader/v3/kv/put" POST "$work/etcd.json" 64)

python3 - "$am1" "$am64" "$et1" "$et64" "$fsync_p50" "$fsync_p99" "$rtt_p50" "$rtt_p99" <<'PY'
import json, sys
am1, am64, et1, et64 = (json.loads(a) for a in sys.argv[1:5])
fs50, fs99, rt50, rt99 = sys.argv[5:9]
print("| system | clients | writes/s | p50 | p99 | errors |")
print("|---|---|---|---|---|---|")
for name, r in (("agentmesh", am1), ("etcd 3.4", et1), ("agentmesh", am64), ("etcd 3.4", et64)):
    print(f"| {name} | {r['clients']} | {r['per_second']:,.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['errors']} |")
print()
print(f"Floors of this machine: fdatasync of a 256-byte append p50 {fs50} ms, p99 {fs99} ms; "
      f"64-byte loopback TCP round trip p50 {rt50} µs, p99 {rt99} µs.")
PY
