#!/usr/bin/env bash
# Runs the `random` scenario (or another, with SCENARIO=name) on N seeds and
# prints each failure with the command that reproduces it.
#   scripts/sim-soak.sh N [FIRST_SEED]     e.g. scripts/sim-soak.sh 200
# Extra sim flags through SIM_ARGS, e.g. SIM_ARGS="--nodes 15 --regions 3 --duration 2m".
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ $# -ge 1 ] || { echo "usage: scripts/sim-soak.sh N [FIRST_SEED]" >&2; exit 2; }
n=$1 first=${2:-1} scenario=${SCENARIO:-random}
[[ "$n" =~ ^[0-9]+$ ]] || die "N must be a number of seeds, got $n"
"$AGENTMESH_ROOT/scripts/setup.sh"
say "building agentmesh (release)"
(cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh)
bin="$CARGO_TARGET_DIR/release/agentmesh"
work="$(mktemp -d -t agentmesh-soak.XXXXXX)"
failures=0
for seed in $(seq "$first" $((first + n - 1))); do
    # shellcheck disable=SC2086
    if ! (cd "$work" && "$bin" sim --scenario "$scenario" --seed "$seed" ${SIM_ARGS:-} >"$work/$seed.out" 2>"$work/$seed.err"); then
        failures=$((failures + 1))
        echo "seed $seed FAILED:"
        grep -E "✗|reproduce with" "$work/$seed.out" "$work/$seed.err" | sed 's/^/    /' || true
    else
        printf 'seed %s ok  %s\n' "$seed" "$(grep -E 'speed-up' "$work/$seed.out" | tr -s ' ')"
    fi
done
echo
echo "soak: $n seeds of $scenario, $failures failed (histories of failed runs in $work)"
[ "$failures" -eq 0 ]
