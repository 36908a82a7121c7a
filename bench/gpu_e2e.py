"""`finepurify` end to end on a model on the GPU: a randomly initialised OPT classifier of a real
shape (default OPT-1.3B, float32 weights), or a Llama causal LM (`--model llama-1b`: the
Llama-3.2-1B shape, tied embeddings, 1.24B parameters), saved as a pre-trained and a drifted
suspect checkpoint, then the commands a user runs, each timed:

1. ``finepurify purify --device cuda --dtype bfloat16`` in memory: Hessian, purification with the
   pre-trained state streamed from the CPU, mixed-precision clean fine-tuning, the purified model
   written;
2. ``finepurify hessian --device cuda``, then ``finepurify purify --hessian-file ... --device cuda``
   out of core (shards read piece by piece and reset on the GPU; the threshold search scores them
   where ``checkpoint.search_device`` says).

Synthetic clean data (random words of a small word-level vocabulary; for the causal LM,
prompt/response pairs in JSONL). Writes a JSON report with each command's wall time, exit code and
the tail of its output.

    python bench/gpu_e2e.py --out bench/results/gpu_e2e.json
    python bench/gpu_e2e.py --model llama-1b --out bench/results/gpu_e2e_llm.json
    python bench/gpu_e2e.py --model tiny --device cpu --out /tmp/e2e.json     # smoke runs
    python bench/gpu_e2e.py --model llama-tiny --device cpu --out /tmp/e2e_llm.json
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

from bench_pipeline import MODELS  # the OPT shapes
from common import git_commit, write_json_atomically

WORDS = [f"w{i}" for i in range(500)]
LLAMA = {  # Llama shapes (causal LMs)
    "llama-tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-1B
}


def make_dirs(root, name, seed=0):
    """The pre-trained and suspect directories and the clean data file of model shape ``name``."""
    from transformers import (BertTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForSequenceClassification)

    vocab = os.path.join(root, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=vocab, model_input_names=["input_ids", "attention_mask"])
    causal = name in LLAMA
    if causal:
        config = LlamaConfig(**LLAMA[name], max_position_embeddings=512, pad_token_id=0, eos_token_id=3)
    else:
        shape = MODELS[name]
        config = OPTConfig(**shape, max_position_embeddings=512,
                           word_embed_proj_dim=shape["hidden_size"], num_labels=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config) if causal else OPTForSequenceClassification(config)
    dirs = {}
    for role in ("pre", "suspect"):
        if role == "suspect":  # fine-tuning moved every weight a little, a few a lot
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, device=p.device) * 1e-3)
        dirs[role] = os.path.join(root, role)
        model.save_pretrained(dirs[role], safe_serialization=True)
        tokenizer.save_pretrained(dirs[role])
    del model
    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    if causal:
        clean = os.path.join(root, "clean.jsonl")
        with open(clean, "w") as f:
            for _ in range(256):
                f.write(json.dumps({"prompt": words(16), "response": words(8)}) + "\n")
        return dirs, clean
    clean = os.path.join(root, "clean.csv")
    with open(clean, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(256):
            writer.writerow([words(24), rng.randint(0, 1)])
    return dirs, clean


def run(args, timeout):
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "finepurify_ext.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:
        rc, output = "timeout", (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    tail = [line for line in output.replace("\r", "\n").splitlines() if line.strip()][-6:]
    print(f"{' '.join(args[:1] + args[-4:])}: rc {rc} in {seconds:.1f} s", flush=True)
    for line in tail:
        print("    " + line)
    return {"command": "finepurify " + " ".join(args), "rc": rc, "seconds": round(seconds, 2), "output_tail": tail}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-1.3b", choices=[*MODELS, *LLAMA])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per command")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "gpu_e2e.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        dirs, clean = make_dirs(root, args.model)
        setup_s = time.perf_counter() - start
        steps = []
        common = ["--device", args.device]
        steps.append(run(["purify", "--pretrained", dirs["pre"], "--suspect", dirs["suspect"], "--clean-data", clean,
                          "--out", os.path.join(root, "purified"), "--finetune-steps", "4", "--dtype", "bfloat16",
                          *common], args.timeout))
        report_path = os.path.join(root, "purified", "finepurify_report.json")
        in_memory = json.load(open(report_path)) if os.path.exists(report_path) else None
        hessian = os.path.join(root, "hessian.safetensors")
        steps.append(run(["hessian", "--model", dirs["suspect"], "--clean-data", clean, "--out", hessian,
                          "--batch-size", "16", *common], args.timeout))
        steps.append(run(["purify", "--pretrained", dirs["pre"], "--suspect", dirs["suspect"], "--hessian-file", hessian,
                          "--out", os.path.join(root, "purified_ooc"), *common], args.timeout))
        ooc_path = os.path.join(root, "purified_ooc", "finepurify_report.json")
        out_of_core = json.load(open(ooc_path)) if os.path.exists(ooc_path) else None
    parameters = None
    if in_memory is not None:
        parameters = sum(in_memory["purify"]["numel_per_parameter"].values())
    write_json_atomically(args.out, {
        "command": "python bench/gpu_e2e.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU",
        "torch": torch.__version__,
        "model": f"random-init {'LlamaForCausalLM' if args.model in LLAMA else 'OPTForSequenceClassification'}, "
                 f"{args.model} shape, float32 weights",
        "scored_parameters": parameters,
        "setup_s": round(setup_s, 1),
        "steps": steps,
        "in_memory": None if in_memory is None else {
            "timings_s": in_memory.get("timings_s"), "device": in_memory.get("device"),
            "num_reset": in_memory["purify"]["num_reset"], "moved_elements": in_memory["purify"]["moved_elements"]},
        "out_of_core": None if out_of_core is None else {
            k: out_of_core.get(k) for k in ("num_reset", "moved_elements", "bytes_read", "threshold_passes",
                                            "timings_s", "embedding_tensor", "embedding_rows_reset")},
    })
    print(f"wrote {args.out}")
    if any(s["rc"] != 0 for s in steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
