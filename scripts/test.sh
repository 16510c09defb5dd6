#!/usr/bin/env bash
# Installs what is missing, then runs every test: unit tests beside the code,
# the integration tests in tests/ that start real agentmesh processes, the
# simulator's scenarios in sim/tests/, and the simulator's planted-bug test
# (built separately: it needs the `planted-bugs` feature).
# Ends with one summary line: "N passed, N failed, N skipped".
set -euo pipefail
source "$(dirname "$0")/lib.sh"
"$AGENTMESH_ROOT/scripts/setup.sh"

cd "$AGENTMESH_ROOT"
say "building tests"
cargo test --locked --workspace --no-run
cargo test --locked -p agentmesh-sim --features planted-bugs --test planted_bug --no-run
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
say "running tests"
set +e
cargo test --locked --workspace --no-fail-fast -- --color never --show-output 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
cargo test --locked -p agentmesh-sim --features planted-bugs --test planted_bug -- --color never --show-output 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
set -e

# Sum cargo's "test result:" lines; skips are the tests that print "SKIPPED:".
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed;?/) p += $i
        if ($(i+1) ~ /^failed;?/) f += $i
        if ($(i+1) ~ /^ignored;?/) g += $i
    }
} END { print p + 0, f + 0, g + 0 }' "$log")
skipped=$(grep -c '^SKIPPED:' "$log" || true)
# cargo counts a test that printed SKIPPED and returned as passed; it did not run.
passed=$((passed - skipped))
if [ "$skipped" -gt 0 ]; then
    say "skipped tests (and why):"
    grep '^SKIPPED:' "$log" >&2
fi
echo
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$status" -eq 0 ] || die "some tests failed (cargo exit $status)"
