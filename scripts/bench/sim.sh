#!/usr/bin/env bash
# Simulator speed: simulated seconds per wall second at 15 nodes in 3 regions
# and at 100 nodes in 10 regions (10 simulated minutes of the `random`
# scenario each), then the largest mesh (10 nodes per region) that runs 10
# simulated minutes in under 10 wall minutes.
# Usage: scripts/bench/sim.sh AGENTMESH_BIN [SIZES]   (SIZES default "200 400 700 1000")
set -euo pipefail
bin=$1 sizes=${2:-"200 400 700 1000"}
log() { echo "$*" >&2; }

row() { # NODES REGIONS DURATION TIMEOUT_S
    local out status=0
    out=$(timeout "$4" "$bin" sim --scenario random --seed 1 --nodes "$1" --regions "$2" --duration "$3" --json 2>/dev/null) || status=$?
    # 1: the run finished and an invariant failed (the row says FAILED); 124: out of time.
    if [ "$status" -eq 0 ] || { [ "$status" -eq 1 ] && [ -n "$out" ]; }; then
        python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
verdict = "passed" if r["passed"] else "FAILED"
print("| %d | %d | %.0f s | %.1f s | %.1f× | %s | %s |" % (
    r["nodes"], r["regions"], r["simulated_s"], r["wall_s"], r["speedup"],
    format(r["messages"], ","), verdict))
PY
        return 0
    fi
    echo "| $1 | $2 | $3 | > $4 s | < $(python3 -c "print(round(600/$4, 2))")× | | did not finish in time |"
    return 1
}

echo "| nodes | regions | simulated | wall | speed-up | messages | invariants |"
echo "|---|---|---|---|---|---|---|"
log "15 nodes, 3 regions"
row 15 3 10m 600 || true
log "100 nodes, 10 regions"
row 100 10 10m 600 || true
largest=""
for n in $sizes; do
    log "$n nodes, $((n / 10)) regions: 10 simulated minutes within 600 wall seconds?"
    if row "$n" $((n / 10)) 10m 600; then largest=$n; else break; fi
done
echo
echo "Largest mesh tried that ran 10 simulated minutes in under 10 wall minutes: ${largest:-none of $sizes} nodes."
