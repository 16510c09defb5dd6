#!/usr/bin/env bash
# Models: agentmesh (Candle, CPU) against sentence-transformers (PyTorch,
# CPU) for embeddings and llama.cpp (llama-cpp-python) for generation, on
# the same model files, the same inputs and the same thread count.
# DEVICE cuda (a models-bench built with `--features cuda`, on a machine
# with a GPU): Candle CUDA against PyTorch CUDA for both, generation
# through transformers on the same GGUF (peer part generate-torch).
# Every measure is taken RUNS times (default 3) on each side; the table
# shows the medians and each run in brackets: this 2-vCPU machine varies by
# about 20 % from run to run.
# Usage: scripts/bench/models.sh MODELS_BENCH_BIN VENV_PYTHON [RUNS] [cpu|cuda]
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
bin=$1 python=$2 runs=${3:-3} device=${4:-cpu}
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive number, got $runs"
case "$device" in
    cpu) gen_part=generate gen_peer=llama.cpp ;;
    cuda) gen_part=generate-torch gen_peer="PyTorch (transformers)" ;;
    *) die "DEVICE must be cpu or cuda, got $device" ;;
esac
work="$(mktemp -d -t agentmesh-bench-models.XXXXXX)"
trap 'rm -f -r "$work"' EXIT
threads=$(nproc)

# 1,000 short sentences, the same for both sides.
python3 - "$work/sentences.txt" <<'PY'
import itertools, sys
subjects = ["The cat", "A kitten", "My neighbour", "The old man", "A child", "The engineer", "Our team", "The market", "A storm", "The river"]
verbs = ["watches", "finds", "builds", "crosses", "follows", "paints", "measures", "loses", "carries", "describes"]
objects = ["the bridge", "a red kite", "the long report", "an empty box", "the quiet garden", "a bright star", "the last train", "a wooden chair", "the morning news", "a cold wind"]
lines = [f"{s} {v} {o}." for s, v, o in itertools.product(subjects, verbs, objects)]
open(sys.argv[1], "w").write("\n".join(lines[:1000]) + "\n")
PY
# A prompt of about 128 tokens.
cat >"$work/prompt.txt" <<'TXT'
The river town woke slowly. Fishermen pulled their boats onto the gravel, the baker opened his shutters, and the smell of bread drifted over the square. At the far end of the street an old clock tower struck seven, and a flock of pigeons rose from its roof. Children with satchels hurried past the fountain, arguing about a football match, while their parents stood in line at the market stalls. Nobody noticed the stranger who stepped off the first bus of the day, carrying a small leather case and a map folded many times. He looked at the tower, then at the map, and
TXT

say "agentmesh (Candle, $device, $threads threads)"
ours=$("$bin" --models-dir "$AGENTMESH_MODELS_DIR" --sentences "$work/sentences.txt" --prompt "$work/prompt.txt" --new-tokens 128 --runs "$runs")
say "sentence-transformers and $gen_peer ($device, $threads threads)"
peer_embed=$("$python" "$AGENTMESH_ROOT/scripts/bench/models_peer.py" embed "$AGENTMESH_MODELS_DIR" "$work/sentences.txt" "$work/prompt.txt" "$threads" 128 "$runs" "$device")
peer_gen=$("$python" "$AGENTMESH_ROOT/scripts/bench/models_peer.py" "$gen_part" "$AGENTMESH_MODELS_DIR" "$work/sentences.txt" "$work/prompt.txt" "$threads" 128 "$runs" "$device")

python3 - "$ours" "$peer_embed" "$peer_gen" "$gen_peer" <<'PY'
import json, sys
a = json.loads(sys.argv[1])
e, g = json.loads(sys.argv[2]), json.loads(sys.argv[3])
gen_peer = sys.argv[4]
p = {**e, **g, "runs": {**e["runs"], **g["runs"]}}
if a["device"] != p["device"]:
    sys.exit(f"error: agentmesh ran on {a['device']}, the peer on {p['device']}: build models-bench with --features cuda for a GPU run")
def row(what, key, unit):
    ours, peer = a[key], p[key]
    runs = lambda d: ", ".join(f"{x:,.1f}" for x in d["runs"][key])
    print(f"| {what} | {ours:,.1f} {unit} ({runs(a)}) | {peer:,.1f} {unit} ({runs(p)}) | {ours / peer:.2f}× |")
versions = ", ".join(f"{k} {p[k]}" for k in ("torch", "transformers", "llama_cpp_python") if k in p)
where = f"GPU: {p['gpu']}" if "gpu" in p else f"threads: {p['threads']}"
print(f"Device: {p['device']}; {where}; {versions}; "
      f"prompt {a['prompt_tokens']} tokens here, {p['prompt_tokens']} for {gen_peer}; {a['sentences']} sentences.")
print()
print("| measure | agentmesh (Candle) | peer | ratio |")
print("|---|---|---|---|")
row("embeddings, batch 1 (vs sentence-transformers)", "embed_per_second_batch1", "sentences/s")
row("embeddings, batch 32 (vs sentence-transformers)", "embed_per_second_batch32", "sentences/s")
row(f"prompt processing (vs {gen_peer})", "prompt_tokens_per_second", "tokens/s")
row(f"generation, greedy (vs {gen_peer})", "generate_tokens_per_second", "tokens/s")
PY
