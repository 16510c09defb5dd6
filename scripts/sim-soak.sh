#!/usr/bin/env bash
# Runs the `random` scenario (or another, with SCENARIO=name; SCENARIO=all
# takes every built-in scenario in turn, seed after seed) on N seeds and
# prints each failure with the command that reproduces it. A run that cannot
# start (a bad scenario or flag) counts as a failure too.
#   scripts/sim-soak.sh N [FIRST_SEED]     e.g. scripts/sim-soak.sh 200
#   SCENARIO=all scripts/sim-soak.sh 2000
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
if [ "$scenario" = all ]; then
    # The built-in names, from the binary itself.
    read -r -a scenarios < <("$bin" sim --help | sed -n 's/.*Built in: //p' | tr -d ',')
    [ ${#scenarios[@]} -gt 0 ] || die "cannot list the built-in scenarios"
else
    scenarios=("$scenario")
fi
failures=0
i=0
for seed in $(seq "$first" $((first + n - 1))); do
    name=${scenarios[$((i % ${#scenarios[@]}))]}
    i=$((i + 1))
    # shellcheck disable=SC2086
    if ! (cd "$work" && "$bin" sim --scenario "$name" --seed "$seed" ${SIM_ARGS:-} >"$work/$seed.out" 2>"$work/$seed.err"); then
        failures=$((failures + 1))
        echo "$name seed $seed FAILED:"
        grep -E "✗|reproduce with|^error" "$work/$seed.out" "$work/$seed.err" | sed 's/^/    /' || true
    else
        printf '%s seed %s ok  %s\n' "$name" "$seed" "$(grep -E 'speed-up' "$work/$seed.out" | tr -s ' ')"
    fi
done
echo
echo "soak: $n seeds over ${#scenarios[@]} scenario(s) ($scenario), $failures failed (histories of failed runs in $work)"
[ "$failures" -eq 0 ]
