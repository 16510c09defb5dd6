# Shared by the scripts: where builds go, and small helpers. Source it.
# shellcheck shell=bash

AGENTMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Outside the clone, so CI and reruns build incrementally.
export CARGO_TARGET_DIR="${AGENTMESH_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentmesh/target}"
AGENTMESH_BIN="$CARGO_TARGET_DIR/debug/agentmesh"
# The model weights (scripts/models.sh), outside the clone and outside git.
export AGENTMESH_MODELS_DIR="${AGENTMESH_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentmesh/models}"

say() { if [ -t 2 ]; then printf '\033[1m==> %s\033[0m\n' "$*" >&2; else printf '==> %s\n' "$*" >&2; fi; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs the Debian packages given, if any is missing (idempotent, quiet when all are there).
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them; install them by hand"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing ${missing[*]}"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

build() {
    say "building agentmesh (target dir $CARGO_TARGET_DIR)"
    (cd "$AGENTMESH_ROOT" && cargo build --locked --workspace --bins "$@")
}

# start_node BIN WORKDIR NAME REGION [BOOTSTRAP]: starts a node on loopback
# with free ports, data in WORKDIR/NAME, logs in WORKDIR/NAME.log; waits for
# its ready line and leaves it in $ready and the pid appended to $pids.
# Run it directly, not in $(...): the pid must reach the caller's $pids.
start_node() {
    local bin=$1 work=$2 name=$3 region=$4 bootstrap=${5:-}
    local args=(node start --data-dir "$work/$name" --region "$region"
                --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0)
    [ -n "$bootstrap" ] && args+=(--bootstrap "$bootstrap")
    # Anything after the bootstrap address goes to `node start` as it is.
    [ $# -gt 5 ] && args+=("${@:6}")
    mkfifo "$work/$name.ready"
    "$bin" "${args[@]}" >"$work/$name.ready" 2>"$work/$name.log" &
    pids+=($!)
    local fd
    exec {fd}<"$work/$name.ready"
    if ! read -r -t 30 ready <&"$fd"; then
        cat "$work/$name.log" >&2
        die "node $name did not get ready"
    fi
    # Keep draining stdout so the node never blocks on it.
    cat <&"$fd" >/dev/null &
    exec {fd}<&-
}
