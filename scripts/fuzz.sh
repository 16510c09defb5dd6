#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each,
# one after the other, and prints one line per target: executions, seconds,
# crashes. Exits non-zero when a target crashed; the input that crashed it
# is kept in fuzz/artifacts/TARGET/ and the log in $FUZZ_LOG_DIR.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. scripts/fuzz.sh 60 raft_rpc
# No nightly toolchain here: cargo-fuzz runs on stable with RUSTC_BOOTSTRAP=1.
# AddressSanitizer by default; FUZZ_SANITIZER=none builds without (the
# script falls back to it by itself when the ASan build fails).
# Reproduce a crash: RUSTC_BOOTSTRAP=1 cargo fuzz run -a TARGET fuzz/artifacts/TARGET/crash-…
set -euo pipefail
source "$(dirname "$0")/lib.sh"
seconds=${1:-600}
[[ "$seconds" =~ ^[0-9]+$ ]] || die "SECONDS must be a number, got $seconds"
shift || true

# Each target, and the longest input it gets: the real limit of what it
# decodes, or 1 MiB where that limit is larger (bigger claims are reached
# through length prefixes, not through longer inputs).
declare -A max_len=(
    [envelope_open]=262144     # ENVELOPE_DECODE_LIMIT
    [sync_decode]=1048576      # FRAME_LEN_MAX is 16 MiB
    [raft_rpc]=1048576         # codec::DECODE_LIMIT is 64 MiB
    [snapshot_chunk]=65536     # structured: a list of chunks
    [raft_link_frame]=65536    # a 4-byte length, then the frame
    [forward]=131072          # FORWARD_REQUEST_MAX (answers: 4 MiB)
    [config_file]=65536
    [policy_file]=65536        # the HTTP API's body limit (REQUEST_BODY_MAX)
)
# Any single allocation past this (MiB) is a crash: every decoder is
# bounded well below it, and a snapshot may not pass 32 MiB.
declare -A malloc_limit=([snapshot_chunk]=256)
all=(envelope_open sync_decode raft_rpc snapshot_chunk raft_link_frame forward config_file policy_file)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [ -n "${max_len[$t]:-}" ] || die "unknown fuzz target $t (known: ${all[*]})"
done

export RUSTC_BOOTSTRAP=1
# The fuzz build (sanitizer, coverage) goes to a target dir of its own.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentmesh/fuzz-target}"
logs="${FUZZ_LOG_DIR:-$(mktemp -d -t agentmesh-fuzz.XXXXXX)}"
mkdir -p "$logs"

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$AGENTMESH_ROOT"
sanitizer=${FUZZ_SANITIZER:-address}
say "building the fuzz targets (sanitizer $sanitizer, target dir $CARGO_TARGET_DIR)"
# -a: debug assertions, so arithmetic overflow on peer-supplied numbers panics.
if ! cargo fuzz build -a -s "$sanitizer" >"$logs/build.log" 2>&1; then
    if [ "$sanitizer" = address ] && [ -z "${FUZZ_SANITIZER:-}" ]; then
        say "the AddressSanitizer build failed (see $logs/build.log); building without a sanitizer"
        sanitizer=none
        cargo fuzz build -a -s none >"$logs/build.log" 2>&1 || { tail -30 "$logs/build.log" >&2; die "fuzz build failed"; }
    else
        tail -30 "$logs/build.log" >&2
        die "fuzz build failed"
    fi
fi

crashed=0
summary=()
for t in "${targets[@]}"; do
    # cargo-fuzz keeps crashing inputs in fuzz/artifacts/TARGET/.
    corpus="fuzz/corpus/$t" artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
    before=$(find "$artifacts" -type f | wc -l)
    say "fuzzing $t for ${seconds}s (log $logs/$t.log)"
    start=$(date +%s)
    status=0
    cargo fuzz run -a -s "$sanitizer" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=2048 \
        -malloc_limit_mb="${malloc_limit[$t]:-512}" -max_len="${max_len[$t]}" \
        -print_final_stats=1 >"$logs/$t.log" 2>&1 || status=$?
    # The seconds libFuzzer ran (the build before it not counted).
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$logs/$t.log" | tail -1)
    took=${took:-$(($(date +%s) - start))}
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    if [ -z "$execs" ]; then
        # Stopped by a crash: the last status line says how far it got.
        execs=$(grep -oE '^#[0-9]+' "$logs/$t.log" | tail -1 | tr -d '#')
    fi
    crashes=$(($(find "$artifacts" -type f | wc -l) - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1
        tail -20 "$logs/$t.log" >&2
    fi
    [ "$crashes" -eq 0 ] || crashed=$((crashed + 1))
    line=$(printf '%-16s %12s execs  %5ss  %s crash(es)  sanitizer %s' "$t" "${execs:-?}" "$took" "$crashes" "$sanitizer")
    summary+=("$line")
    echo "$line"
done
echo
echo "fuzz: ${#targets[@]} target(s), ${seconds}s each, logs in $logs"
printf '  %s\n' "${summary[@]}"
[ "$crashed" -eq 0 ] || die "$crashed target(s) crashed; inputs in fuzz/artifacts/"
