"""Recovering clean accuracy after the reset: clean fine-tuning on the 192 labels alone, against the
suspect as a teacher (its soft targets on the clean texts), and the teacher on unlabelled in-domain
tweets as well (issue 11's first lead; DESIGN.md's practice notes).

Fine-purifying with the default configuration at reserve ratios 0.5 (the CLI default) and 0.3, on the
defence table's models and split (192 clean tweets for the Hessian and fine-tuning, 64 held out for
early stopping, 1,000 test tweets). The unlabelled tweets are a fourth disjoint draw from the corpus
(their labels are dropped). The variants were fixed before any run; nothing is chosen on test data.
Resumable: each finished run is saved at once.

    python bench/clean_recovery.py                          # 3 triggers x 3 seeds x 3 variants x 2 rhos
    python bench/clean_recovery.py --attacks sentence --seeds 0 1 2

Writes bench/results/clean_recovery.json (runs and the summary with the target check).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, write_json_atomically  # noqa: E402
from bench.defence_table import _mean_sd  # noqa: E402

UNLABELLED = 2000
VARIANTS = {  # (weight of the teacher's soft targets, unlabelled tweets)
    "labels": (0.0, 0),
    "teacher": (0.5, 0),
    "teacher+unlabelled": (0.5, UNLABELLED),
}


def key(attack, seed, variant, rho):
    return f"{attack}/seed{seed}/{variant}/{rho:g}"


def measure_cell(attack_name, seed, args, results, save):
    from finepurify_ext import data
    from finepurify_ext.demo import DefenceCell, suite_setting
    from finepurify_ext.pipeline import FinetuneConfig

    todo = [(v, r) for v in args.variants for r in args.rhos if key(attack_name, seed, v, r) not in results["runs"]]
    cell_name = f"{attack_name}/seed{seed}"
    if not todo and cell_name in results["models"]:
        return
    cell = DefenceCell(suite_setting(attack_name), seed)
    s = cell.setting
    sizes = [s.attack_train, s.clean, s.test, UNLABELLED]
    unlabelled = [e.text for e in data.split(data.tweet_sentiment(), sizes, s.data_seed)[3]]
    if cell_name not in results["models"]:
        results["models"][cell_name] = {"backdoored": cell.measure(cell.suspect),
                                        "clean_trained": cell.measure(cell.reference)}
        save()
    for variant, rho in todo:
        weight, n_unlabelled = VARIANTS[variant]
        _, row, _ = cell.defend("fine_purifying", rho, FinetuneConfig(distill=weight),
                                unlabelled=unlabelled[:n_unlabelled])
        row = {"attack": attack_name, "seed": seed, "variant": variant, **row}
        results["runs"][key(attack_name, seed, variant, rho)] = row
        save()
        print(f"  {cell_name} {variant:20s} rho {rho:.2f}: CACC {100 * row['cacc']:5.1f}  ASR {100 * row['asr']:5.1f}  "
              f"step {row['finetune_step_chosen']:3d}/{row['finetune_steps_run']:3d} ({row['time_s']:.0f} s)", flush=True)


def summarise(results, args):
    """Per trigger, variant and rho over the seeds that have every run: CACC and ASR (mean, sd) and the
    target (ASR at most the clean-trained model's + 10 points, CACC at least the backdoored's - 3)."""
    summary = {}
    runs = results["runs"]
    for attack in args.attacks:
        seeds = [s for s in args.seeds if f"{attack}/seed{s}" in results["models"]
                 and all(key(attack, s, v, r) in runs for v in args.variants for r in args.rhos)]
        if not seeds:
            continue
        models = [results["models"][f"{attack}/seed{s}"] for s in seeds]
        reference_asr = _mean_sd(m["clean_trained"]["asr"] for m in models)
        backdoored_cacc = _mean_sd(m["backdoored"]["cacc"] for m in models)
        cells = {}
        for variant in args.variants:
            for rho in args.rhos:
                rows = [runs[key(attack, s, variant, rho)] for s in seeds]
                cacc, asr = _mean_sd(r["cacc"] for r in rows), _mean_sd(r["asr"] for r in rows)
                cells[f"{variant}/{rho:g}"] = {
                    "cacc": cacc, "asr": asr,
                    "asr_excess_points": 100 * (asr["mean"] - reference_asr["mean"]),
                    "cacc_drop_points": 100 * (backdoored_cacc["mean"] - cacc["mean"]),
                    "meets_target": asr["mean"] <= reference_asr["mean"] + 0.10
                    and cacc["mean"] >= backdoored_cacc["mean"] - 0.03,
                    "finetune_step_chosen": _mean_sd(r["finetune_step_chosen"] for r in rows)}
        summary[attack] = {"seeds": seeds, "clean_trained_asr": reference_asr, "backdoored_cacc": backdoored_cacc,
                           "backdoored_asr": _mean_sd(m["backdoored"]["asr"] for m in models), "cells": cells}
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=["sentence", "word", "embedding"],
                        help="attacks of bench/defence_table.py's suite on the tweets")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "clean_recovery.json"))
    args = parser.parse_args()
    os.environ.setdefault("FINEPURIFY_CACHE", os.path.join(os.path.dirname(HERE), ".cache", "finepurify"))
    results = {"runs": {}, "models": {}}
    if os.path.exists(args.out):
        import json

        with open(args.out) as f:
            results = json.load(f)
        results.setdefault("runs", {}), results.setdefault("models", {})

    commit = git_commit()  # the code this process runs, whatever is committed while it runs
    # Every process that added runs, in order (the runs of one table may come from several).
    results.setdefault("processes", []).append({"command": "python " + " ".join(sys.argv), "commit": commit,
                                                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})

    def save():
        results["meta"] = {"command": "python " + " ".join(sys.argv), "commit": commit,
                           "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs "
                           f"({platform.processor() or 'cpu'}), threads {torch.get_num_threads()}",
                           "variants": {v: {"distill": w, "unlabelled": n} for v, (w, n) in VARIANTS.items()}}
        results["summary"] = summarise(results, args)
        write_json_atomically(args.out, results)

    for attack in args.attacks:
        for seed in args.seeds:
            measure_cell(attack, seed, args, results, save)
    save()
    for attack, s in results["summary"].items():
        print(f"{attack} (seeds {s['seeds']}): clean-trained ASR {100 * s['clean_trained_asr']['mean']:.1f}, "
              f"backdoored CACC {100 * s['backdoored_cacc']['mean']:.1f}")
        for name, c in s["cells"].items():
            print(f"  {name:26s} CACC {100 * c['cacc']['mean']:5.1f}±{100 * c['cacc']['sd']:.1f}  "
                  f"ASR {100 * c['asr']['mean']:5.1f}±{100 * c['asr']['sd']:.1f}  "
                  f"{'meets' if c['meets_target'] else 'misses'} (ASR +{c['asr_excess_points']:.1f}, "
                  f"CACC -{c['cacc_drop_points']:.1f})")


if __name__ == "__main__":
    main()
