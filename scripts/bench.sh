#!/usr/bin/env bash
# Benchmarks, side by side with the peer each one is measured against.
#   scripts/bench.sh discovery [--sizes 3,10,30] [--runs 3] [--idle-s 300]
#   scripts/bench.sh policy [SECONDS]
#   scripts/bench.sh sim ["SIZES"]
#   scripts/bench.sh models [RUNS]
#   scripts/bench.sh models-cuda [RUNS]   (a machine with a GPU and nvcc)
#   scripts/bench.sh tasks [RUNS] [SECONDS]   (against Ray actor calls)
#   scripts/bench.sh failover [RUNS] [IDLE_S]   (a killed host's counter agent served again; Serf's detection beside it)
# Prints markdown tables for BENCHMARKS.md. Never part of the tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() { echo "usage: scripts/bench.sh discovery [--sizes 3,10,30] [--runs 3] [--idle-s 300] | policy [SECONDS] | sim [\"200 400 700 1000\"] | models [RUNS] | models-cuda [RUNS] | tasks [RUNS] [SECONDS] | failover [RUNS] [IDLE_S]" >&2; exit 2; }
[ $# -ge 1 ] || usage
what=$1; shift

"$AGENTMESH_ROOT/scripts/setup.sh"
case "$what" in
    discovery)
        apt_install serf python3
        say "building agentmesh (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh)
        say "agentmesh against serf $(serf version | head -1) on $(nproc) cores"
        python3 "$AGENTMESH_ROOT/scripts/bench/discovery.py" --agentmesh "$CARGO_TARGET_DIR/release/agentmesh" "$@"
        ;;
    policy)
        apt_install etcd-server curl python3
        say "building agentmesh and the load generator (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh -p agentmesh-bench)
        say "agentmesh against $(etcd --version | head -1) on $(nproc) cores"
        "$AGENTMESH_ROOT/scripts/bench/policy.sh" "$CARGO_TARGET_DIR/release/agentmesh" "$CARGO_TARGET_DIR/release/loadgen" "$@"
        ;;
    sim)
        apt_install python3
        say "building agentmesh (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh)
        say "the simulator on $(nproc) cores"
        "$AGENTMESH_ROOT/scripts/bench/sim.sh" "$CARGO_TARGET_DIR/release/agentmesh" "$@"
        ;;
    models)
        apt_install python3 python3-venv cmake build-essential
        venv="$(dirname "$CARGO_TARGET_DIR")/bench-venv"
        if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sentence_transformers, llama_cpp" 2>/dev/null; then
            say "making the peers' venv in $venv (torch, sentence-transformers, llama-cpp-python from PyPI)"
            python3 -m venv "$venv"
            "$venv/bin/pip" install --quiet --disable-pip-version-check torch sentence-transformers
            # llama.cpp's native build enables AMX on this CPU, which the VM does
            # not allow (SIGSEGV at the first eval): build for AVX2/AVX-512 instead.
            CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
                "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir llama-cpp-python
        fi
        say "building the models benchmark (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh-bench --bin models-bench)
        "$AGENTMESH_ROOT/scripts/bench/models.sh" "$CARGO_TARGET_DIR/release/models-bench" "$venv/bin/python" "$@"
        ;;
    models-cuda)
        command -v nvcc >/dev/null || die "models-cuda builds Candle's CUDA kernels: put nvcc (the CUDA toolkit) on PATH, on a machine with an NVIDIA GPU"
        apt_install python3 python3-venv
        venv="$(dirname "$CARGO_TARGET_DIR")/bench-venv-cuda"
        if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sentence_transformers, accelerate, gguf" 2>/dev/null; then
            say "making the peers' venv in $venv (torch with CUDA, sentence-transformers, accelerate, gguf from PyPI)"
            python3 -m venv "$venv"
            "$venv/bin/pip" install --quiet --disable-pip-version-check torch sentence-transformers accelerate gguf
        fi
        say "building the models benchmark with CUDA (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh-bench --features cuda --bin models-bench)
        "$AGENTMESH_ROOT/scripts/bench/models.sh" "$CARGO_TARGET_DIR/release/models-bench" "$venv/bin/python" "${1:-3}" cuda
        ;;
    tasks)
        apt_install python3 python3-venv
        venv="$(dirname "$CARGO_TARGET_DIR")/bench-venv-ray"
        if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import ray" 2>/dev/null; then
            say "making Ray's venv in $venv (ray from PyPI)"
            python3 -m venv "$venv"
            "$venv/bin/pip" install --quiet --disable-pip-version-check ray
        fi
        "$AGENTMESH_ROOT/scripts/models.sh"
        say "building agentmesh and the tasks load generator (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh -p agentmesh-bench --bin agentmesh --bin tasks-bench)
        say "agentmesh tasks against Ray $("$venv/bin/python" -c 'import ray; print(ray.__version__)') on $(nproc) cores"
        "$AGENTMESH_ROOT/scripts/bench/tasks.sh" "$CARGO_TARGET_DIR/release/agentmesh" "$CARGO_TARGET_DIR/release/tasks-bench" "$venv/bin/python" "$@"
        ;;
    failover)
        apt_install serf python3
        say "building agentmesh (release)"
        (cd "$AGENTMESH_ROOT" && cargo build --locked --release -p agentmesh)
        say "agentmesh failover against serf $(serf version | head -1) detection on $(nproc) cores"
        python3 "$AGENTMESH_ROOT/scripts/bench/failover.py" --agentmesh "$CARGO_TARGET_DIR/release/agentmesh" --runs "${1:-10}" ${2:+--idle-s "$2"}
        ;;
    *) usage ;;
esac
