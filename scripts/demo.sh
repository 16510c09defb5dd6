#!/usr/bin/env bash
# The main job, as far as it exists today: a local mesh of five nodes in two
# regions on loopback, each joining through the first one; the eu-west Raft
# group bootstrapped and given a policy through one of its nodes, and read
# back through a node of another region (reads and tasks are forwarded
# anywhere; writes only by a region's own voters until admission control
# exists); the mesh and the region as the nodes see them; a dataset tagged
# pii-eu put on one node, a search agent placed next to it, a task refused
# by residency in us-east and answered in eu-west with its provenance, and
# the host's audit log verified. Stops everything it started, also on
# Ctrl-C or failure.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
"$AGENTMESH_ROOT/scripts/setup.sh"
build

work="$(mktemp -d -t agentmesh-demo.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# start NAME REGION [BOOTSTRAP]: starts a node (see start_node in lib.sh) and shows its ready line.
start() {
    start_node "$AGENTMESH_BIN" "$work" "$@"
    echo "  $1 ($2): $ready"
}

say "starting 5 nodes: 3 in eu-west, 2 in us-east, each joining through the first; eu-1 loads the models"
start eu-1 eu-west "" --models-dir "$AGENTMESH_MODELS_DIR"
seed=$(sed -E 's/.* listen=([^, ]+).*/\1/' <<<"$ready")
api1=$(sed -E 's/.* api=([^ ]+).*/\1/' <<<"$ready")
for spec in eu-2:eu-west eu-3:eu-west us-1:us-east us-2:us-east; do
    start "${spec%%:*}" "${spec##*:}" "$seed"
    last_api=$(sed -E 's/.* api=([^ ]+).*/\1/' <<<"$ready")
    [ "${spec%%:*}" = eu-2 ] && api2=$last_api
done

say "waiting until every node sees all 5 alive"
for _ in $(seq 100); do
    alive=$("$AGENTMESH_BIN" members --api "$last_api" --json | grep -c '"state": "alive"' || true)
    [ "$alive" -eq 5 ] && break
    sleep 0.1
done
[ "$alive" -eq 5 ] || die "the mesh did not converge (last node sees $alive alive)"

say "agentmesh members --api $api1"
"$AGENTMESH_BIN" members --api "$api1"
echo
say "agentmesh members --api $last_api (another region, same mesh)"
"$AGENTMESH_BIN" members --api "$last_api"
echo
say "agentmesh region bootstrap --region eu-west (any node of the region; it picks the voters)"
"$AGENTMESH_BIN" region bootstrap --region eu-west --voters 3 --api "$api1"
echo
say "agentmesh policy apply -f examples/policy.toml --region eu-west (forwarded to the leader)"
"$AGENTMESH_BIN" policy apply -f "$AGENTMESH_ROOT/examples/policy.toml" --region eu-west --api "$api1"
echo
say "agentmesh policy get --region eu-west, read through a us-east node (forwarded over libp2p)"
"$AGENTMESH_BIN" policy get --region eu-west --api "$last_api"
echo
say "agentmesh region status --region eu-west"
"$AGENTMESH_BIN" region status --region eu-west --api "$api1"
echo
say "agentmesh model list --api $api1 (eu-1 checks each file's sha256, then loads it)"
for _ in $(seq 300); do
    loaded=$("$AGENTMESH_BIN" model list --api "$api1" --json | grep -c '"loaded": true' || true)
    [ "$loaded" -eq 2 ] && break
    sleep 0.2
done
"$AGENTMESH_BIN" model list --api "$api1"
[ "$loaded" -eq 2 ] || die "eu-1 did not load both models within 60 s (its log: $work/eu-1.log)"
echo
say "agentmesh model run all-minilm-l6-v2 --input \"The cat sits on the mat.\""
"$AGENTMESH_BIN" model run all-minilm-l6-v2 --input "The cat sits on the mat." --api "$api1"
echo
say "agentmesh model run smollm2-135m-instruct-q4_1 --raw --input \"The capital of France is\" --max-tokens 8"
"$AGENTMESH_BIN" model run smollm2-135m-instruct-q4_1 --raw --input "The capital of France is" --max-tokens 8 --api "$api1"
echo
say "agentmesh data put --dataset docs-eu --file examples/data/docs-eu.jsonl --tag pii-eu (on eu-1: the documents stay there)"
"$AGENTMESH_BIN" data put --dataset docs-eu --file "$AGENTMESH_ROOT/examples/data/docs-eu.jsonl" --tag pii-eu --api "$api1"
echo
say "agentmesh agent deploy -f examples/agents/docs-rag.toml and chat.toml (the leader places each where its data and models are)"
"$AGENTMESH_BIN" agent deploy -f "$AGENTMESH_ROOT/examples/agents/docs-rag.toml" --api "$api1"
"$AGENTMESH_BIN" agent deploy -f "$AGENTMESH_ROOT/examples/agents/chat.toml" --region eu-west --api "$api1"
for _ in $(seq 100); do
    active=$("$AGENTMESH_BIN" agent list --api "$api1" --json | grep -c '"status": "active"' || true)
    [ "$active" -ge 2 ] && break
    sleep 0.1
done
"$AGENTMESH_BIN" agent list --api "$api1"
echo
question="How many days of paid leave do I get?"
say "a rag task on pii-eu data entered through us-east: refused by residency before anything runs"
if "$AGENTMESH_BIN" task submit --agent docs-rag --input "$question" --api "$last_api"; then
    die "residency did not refuse a pii-eu result bound for us-east"
fi
echo
say "the same task entered through eu-2: it runs next to the data (eu-1), answers citing its documents, with its provenance"
"$AGENTMESH_BIN" task submit --agent docs-rag --input "$question" --api "$api2"
echo
say "a generate task through us-east, streamed as it is generated (--stream), with a session it remembers"
"$AGENTMESH_BIN" task submit --agent chat --session demo --input "My name is Ada. Please remember it." --stream --api "$last_api"
echo
"$AGENTMESH_BIN" task submit --agent chat --session demo --input "What is my name?" --stream --api "$last_api"
echo
say "agentmesh audit verify --all (every node's hash-chained record of the tasks it ran; no task ran twice)"
"$AGENTMESH_BIN" audit verify --all --api "$api1"
echo
say "stopping us-2 with SIGTERM: it announces that it leaves"
kill -TERM "${pids[4]}"
wait "${pids[4]}" || true
sleep 0.5
"$AGENTMESH_BIN" members --api "$api1"
echo
say "demo done; stopping the mesh"
