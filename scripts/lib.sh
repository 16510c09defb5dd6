# Shared by the scripts: where builds go, and small helpers. Source it.
# shellcheck shell=bash

AGENTMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Outside the clone, so CI and reruns build incrementally.
export CARGO_TARGET_DIR="${AGENTMESH_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentmesh/target}"
AGENTMESH_BIN="$CARGO_TARGET_DIR/debug/agentmesh"

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
