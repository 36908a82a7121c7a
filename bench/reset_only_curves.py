"""Does the ranking find the backdoor? CACC and ASR right after the reset, before any clean fine-tuning.

Fine-tuning on 192 tweets moves CACC and ASR by several points from one seed to the next, which hides
the differences between rankings in the defence table. Here each ranking resets its budget and the model
is measured at once: a ranking that finds the backdoor's weights removes more ASR at the same budget,
and one that spares the weights the clean task needs keeps more CACC. Fine-purifying is measured with
the Hessian floored at its median (the default), at its 10 % quantile and without a floor.

    python bench/reset_only_curves.py                   # 3 triggers, seed 0, about 25 min on 2 cores
    python bench/reset_only_curves.py --attacks word --seeds 0 1

Writes bench/results/reset_only_curves.json and reset_only_curves_<trigger>.png (another --out: its own
names, OUT_<trigger>.png). Uses the models cached
by bench/defence_table.py (or builds them) and the same 192 clean tweets for the Hessian.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, write_json_atomically  # noqa: E402

VARIANTS = {  # name: PurifyConfig fields
    "fine_purifying": {"ranking": "fine_purifying"},
    "fine_purifying_floor_q0.1": {"ranking": "fine_purifying", "hessian_floor_quantile": 0.1},
    "fine_purifying_no_floor": {"ranking": "fine_purifying", "hessian_floor_quantile": None},
    "no_hessian": {"ranking": "no_hessian"},
    "magnitude": {"ranking": "magnitude"},
    "fine_mixing": {"ranking": "fine_mixing"},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=["word", "sentence", "embedding"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--grid", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "reset_only_curves.json"))
    parser.add_argument("--summary-only", action="store_true", help="only summarise the runs already saved")
    args = parser.parse_args(argv)
    os.environ.setdefault("FINEPURIFY_CACHE", os.path.join(os.path.dirname(HERE), ".cache", "finepurify"))

    from finepurify_ext import data
    from finepurify_ext.attacks import ATTACKS
    from finepurify_ext.demo import DemoSetting, demo_data, demo_models
    from finepurify_ext.pipeline import HessianConfig, clean_hessian, pretrained_state_for, split_validation
    from finepurify_ext.purify import PurifyConfig, purify_
    from finepurify_ext.training import attack_success_rate, clean_accuracy

    results = {"command": "python bench/reset_only_curves.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "commit": git_commit(), "torch": torch.__version__, "grid": args.grid, "runs": {}}
    if os.path.exists(args.out):  # resumable: runs already measured are kept
        import json

        with open(args.out) as f:
            previous = json.load(f)
        if previous.get("grid") == args.grid:
            results["runs"] = previous["runs"]
            results["earlier_commands"] = previous.get("earlier_commands", []) + [previous["command"]]
    start = time.perf_counter()
    for attack_name in args.attacks:
        for seed in args.seeds:
            todo = [(v, r) for v in args.variants for r in args.grid
                    if f"{attack_name}/seed{seed}/{v}/{r:g}" not in results["runs"]]
            if not todo or args.summary_only:
                continue
            setting = DemoSetting(attack=attack_name)
            attack = ATTACKS[attack_name]
            _, clean, test = demo_data(setting)
            suspect, _, tok = demo_models(setting, seed)
            train, _ = split_validation(clean, 0.25, seed)
            pretrained_state = pretrained_state_for(suspect, data.minilm_dir())
            hessians, _ = clean_hessian(suspect, tok, train, HessianConfig(), progress=False)
            for variant, rho in todo:
                fields = VARIANTS[variant]
                model = copy.deepcopy(suspect)
                purify_(model, pretrained_state, hessians, PurifyConfig(reserve_ratio=rho, seed=seed, **fields))
                row = {"cacc": clean_accuracy(model, tok, test),
                       "asr": attack_success_rate(model, tok, test, attack, seed=seed)}
                results["runs"][f"{attack_name}/seed{seed}/{variant}/{rho:g}"] = row
                print(f"{attack_name}/seed{seed} {variant:26s} rho {rho:.1f}: CACC {100 * row['cacc']:5.1f} "
                      f"ASR {100 * row['asr']:5.1f}", flush=True)
                write_json_atomically(args.out, results)
    # Per trigger, the mean over seeds of each variant's curve; CACC - ASR averaged over the grid
    # (higher: more clean accuracy kept and more backdoor removed at the same budgets) and at each
    # variant's best rho (with that rho).
    summary = {}
    for attack_name in args.attacks:
        curves = {}
        for variant in VARIANTS:  # over the seeds measured for this trigger and variant
            seeds = [s for s in args.seeds
                     if all(f"{attack_name}/seed{s}/{variant}/{r:g}" in results["runs"] for r in args.grid)]
            if not seeds:
                continue
            curves[variant] = [{"reserve_ratio": rho, "seeds": seeds, **{k: statistics.fmean(
                results["runs"][f"{attack_name}/seed{s}/{variant}/{rho:g}"][k] for s in seeds)
                for k in ("cacc", "asr")}} for rho in args.grid]
        summary[attack_name] = {
            "curves": curves,
            "mean_cacc_minus_asr_points": {v: 100 * statistics.fmean(p["cacc"] - p["asr"] for p in c)
                                           for v, c in curves.items()},
            # each ranking at its own best budget: the frontier's best point
            "best_cacc_minus_asr_points": {v: max((100 * (p["cacc"] - p["asr"]), p["reserve_ratio"]) for p in c)
                                           for v, c in curves.items()},
        }
    results["summary"] = summary
    results["wall_s"] = time.perf_counter() - start
    results["plots"] = plot(summary, os.path.splitext(args.out)[0])
    write_json_atomically(args.out, results)
    for attack_name, s in summary.items():
        print(attack_name, "mean CACC - ASR over the grid (points):",
              "; ".join(f"{v} {x:.1f}" for v, x in s["mean_cacc_minus_asr_points"].items()))
        print(attack_name, "best CACC - ASR (points, at rho):",
              "; ".join(f"{v} {x:.1f} ({r:g})" for v, (x, r) in s["best_cacc_minus_asr_points"].items()))


def plot(summary, out_stem):
    """One PNG per attack, named after --out (OUT_word.png), so that another --out never replaces the
    committed plots."""
    from finepurify_ext.plots import _pyplot

    plt = _pyplot()
    paths = []
    for attack_name, s in summary.items():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for variant, pts in s["curves"].items():
            ax.plot([100 * p["asr"] for p in pts], [100 * p["cacc"] for p in pts], marker="o",
                    ls="--" if "floor" in variant else "-", label=variant)
            for p in pts:
                ax.annotate(f"{p['reserve_ratio']:g}", (100 * p["asr"], 100 * p["cacc"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("ASR % right after the reset (lower is better)")
        ax.set_ylabel("CACC % right after the reset")
        ax.set_title(f"{attack_name} trigger: reset only, no clean fine-tuning (labels: reserve ratio)", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{out_stem}_{attack_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(os.path.basename(path))
    return paths


if __name__ == "__main__":
    main()
