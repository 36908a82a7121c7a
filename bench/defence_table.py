"""The defence table: every defence on all-MiniLM-L6-v2 backdoored on real tweets, over triggers and seeds.

For each trigger and seed: the backdoored and clean-trained models (cached, as in `finepurify demo`),
the defender's 256 clean tweets split into 192 for fine-tuning and 64 held out; the Hessian once on the
192; then every ranking at every reserve ratio of the grid, plus clean fine-tuning alone (rho = 1, the
shared end of every curve). Clean fine-tuning stops early on the held-out loss. Each run is measured on
the held-out 64 (validation accuracy) and on the 1000 test tweets (CACC, ASR). Each method's rho is
chosen on the validation accuracy alone, by two rules fixed before the runs (see `summarise`); the test
set never chooses anything. Resumable: each finished run is saved at once, and a rerun skips it.

    python bench/defence_table.py                       # 3 triggers x 3 seeds, about 80 min on 2 cores
    python bench/defence_table.py --attacks word --seeds 0
    # one process per seed (1 thread each), then merged:
    for s in 0 1 2; do OMP_NUM_THREADS=1 python bench/defence_table.py --seeds $s --out /tmp/s$s.json & done; wait
    python bench/defence_table.py --summary-only --merge /tmp/s0.json /tmp/s1.json /tmp/s2.json

Writes bench/results/defence_table.json (runs, summary, the target check) and a PNG of the CACC/ASR
curves per trigger beside it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, write_json_atomically  # noqa: E402

METHODS = ("fine_purifying", "no_hessian", "magnitude", "fine_mixing")
LABELS = {"fine_purifying": "Fine-purifying", "no_hessian": "indicator w/o Hessian",
          "magnitude": "magnitude |drift|", "fine_mixing": "Fine-mixing (random)", "clean_ft": "clean fine-tuning"}


def run_key(attack, seed, method, rho):
    return f"{attack}/seed{seed}/{method}/{rho:g}"


def measure_model(model, tok, test, validation, attack, seed) -> dict:
    """CACC and ASR on the test tweets, loss and accuracy on the held-out clean ones."""
    from finepurify_ext.training import attack_success_rate, clean_accuracy, validation_metrics

    loss, accuracy = validation_metrics(model, tok, validation)
    return {"cacc": clean_accuracy(model, tok, test), "asr": attack_success_rate(model, tok, test, attack, seed=seed),
            "validation_accuracy": accuracy, "validation_loss": loss}


def measure_cell(attack_name, seed, args, results, save):
    """All runs of one trigger and seed (skipping those already in ``results``)."""
    from finepurify_ext import data
    from finepurify_ext.attacks import ATTACKS
    from finepurify_ext.demo import QUICK, DemoSetting, demo_data, demo_models
    from finepurify_ext.pipeline import (FinetuneConfig, HessianConfig, clean_hessian, fine_purify,
                                         pretrained_state_for, split_validation)
    from finepurify_ext.purify import PurifyConfig

    setting = dataclasses.replace(QUICK if args.quick else DemoSetting(), attack=attack_name)
    attack = ATTACKS[attack_name]
    cell = f"{attack_name}/seed{seed}"
    todo = [(m, r) for m in args.methods if m != "clean_ft" for r in args.grid
            if run_key(attack_name, seed, m, r) not in results["runs"]]
    if "clean_ft" in args.methods and run_key(attack_name, seed, "clean_ft", 1.0) not in results["runs"]:
        todo.append(("clean_ft", 1.0))
    if not todo and cell in results["models"]:
        return
    _, clean, test = demo_data(setting)
    suspect, reference, tok = demo_models(setting, seed)
    train, validation = split_validation(clean, args.validation_fraction, seed)

    def measure(model):
        return measure_model(model, tok, test, validation, attack, seed)

    if cell not in results["models"]:
        results["models"][cell] = {"backdoored": measure(suspect), "clean_trained": measure(reference)}
        save()
    if not todo:
        return
    pretrained_state = pretrained_state_for(suspect, data.minilm_dir())
    hessians, _ = clean_hessian(suspect, tok, train, HessianConfig(), progress=False)
    ft = FinetuneConfig(steps=args.finetune_steps, lr=args.lr, eval_every=args.eval_every, patience=args.patience)
    for method, rho in todo:
        model = copy.deepcopy(suspect)
        start = time.perf_counter()
        config = None if method == "clean_ft" else PurifyConfig(ranking=method, reserve_ratio=rho)
        report = fine_purify(model, pretrained_state, tok, train, config, ft, seed=seed, progress=False,
                             hessians=hessians, validation=validation)
        elapsed = time.perf_counter() - start
        stopped = report["finetune"]["early_stopping"]
        row = {"attack": attack_name, "seed": seed, "method": method, "reserve_ratio": rho, **measure(model),
               "time_s": elapsed, "num_reset": report.get("purify", {}).get("num_reset", 0),
               "finetune_step_chosen": stopped["chosen_step"], "finetune_steps_run": stopped["steps_run"]}
        results["runs"][run_key(attack_name, seed, method, rho)] = row
        save()
        print(f"  {cell} {LABELS[method]:22s} rho {rho:4.2f}: val {100 * row['validation_accuracy']:5.1f}  "
              f"CACC {100 * row['cacc']:5.1f}  ASR {100 * row['asr']:5.1f}  step {stopped['chosen_step']:3d}/"
              f"{stopped['steps_run']:3d} ({elapsed:.0f} s)", flush=True)


def _mean_sd(values):
    values = list(values)
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def _complete_seeds(results, args, attack):
    runs = results["runs"]
    return [s for s in args.seeds if f"{attack}/seed{s}" in results["models"]
            and all(run_key(attack, s, m, r) in runs for m in METHODS for r in args.grid)
            and run_key(attack, s, "clean_ft", 1.0) in runs]


def _row(runs, attack, seed, method, rho):
    return runs[run_key(attack, seed, "clean_ft" if rho == 1.0 else method, rho)]


def _picked(rows):
    """The chosen run of each seed: their rhos, and CACC and ASR as mean and spread."""
    return {"reserve_ratio": [r["reserve_ratio"] for r in rows],
            "cacc": _mean_sd(r["cacc"] for r in rows), "asr": _mean_sd(r["asr"] for r in rows)}


def pooled_default_rhos(results, args, cells):
    """Rule 1: one rho per method for every trigger and seed, chosen on the
    validation accuracy pooled over all cells: the smallest rho whose mean drop against the backdoored
    model's validation accuracy is at most `tolerance` (else the smallest mean drop)."""
    runs, chosen = results["runs"], {}
    for method in (*METHODS, "clean_ft"):
        grid = [1.0] if method == "clean_ft" else [*args.grid, 1.0]
        drop = {r: statistics.fmean(results["models"][f"{a}/seed{s}"]["backdoored"]["validation_accuracy"]
                                    - _row(runs, a, s, method, r)["validation_accuracy"] for a, s in cells)
                for r in grid}
        passing = [r for r in grid if drop[r] <= args.tolerance + 1e-9]
        chosen[method] = {"reserve_ratio": min(passing) if passing else min(grid, key=lambda r: (drop[r], r)),
                          "mean_validation_drop_points": {f"{r:g}": 100 * d for r, d in drop.items()}}
    return chosen


def summarise(results, args):
    """Per trigger: the default configuration (every method at `--default-rho`, the CLI default), and
    each method at its own rho chosen on validation data only, by two rules fixed before the runs:
    rule 1 (`pooled_default_rhos`) and rule 2 (per model and seed, `finepurify_ext.pipeline.pick_reserve_ratio`,
    what `--reserve-ratio auto` does); the curves over rho; and the issue's targets for each (mean and
    spread over seeds)."""
    from finepurify_ext.pipeline import pick_reserve_ratio

    runs, summary = results["runs"], {}
    complete = {a: _complete_seeds(results, args, a) for a in args.attacks}
    cells = [(a, s) for a in args.attacks for s in complete[a]]
    if not cells:
        return summary
    default = pooled_default_rhos(results, args, cells)
    summary["_default_reserve_ratios"] = default
    # Fine-purifying against each baseline at the same rho, paired over every trigger and seed (the
    # same model, Hessian, clean split and fine-tuning seed): is the Hessian worth its cost per budget?
    summary["_paired_at_equal_rho"] = {
        m: {f"{r:g}": {k: _mean_sd(100 * (_row(runs, a, s, "fine_purifying", r)[k] - _row(runs, a, s, m, r)[k])
                                   for a, s in cells) for k in ("cacc", "asr")} for r in args.grid}
        for m in ("no_hessian", "magnitude", "fine_mixing")}
    for attack in args.attacks:
        seeds = complete[attack]
        if not seeds:
            continue
        models = {s: results["models"][f"{attack}/seed{s}"] for s in seeds}
        by_rule1, by_rule2, by_default, curves = {}, {}, {}, {}
        for method in (*METHODS, "clean_ft"):
            grid = [1.0] if method == "clean_ft" else [*args.grid, 1.0]
            by_default[method] = _picked(
                [_row(runs, attack, s, method, 1.0 if method == "clean_ft" else args.default_rho) for s in seeds])
            by_rule1[method] = _picked([_row(runs, attack, s, method, default[method]["reserve_ratio"]) for s in seeds])
            picks = []
            for s in seeds:
                rho = pick_reserve_ratio({r: _row(runs, attack, s, method, r)["validation_accuracy"] for r in grid},
                                         models[s]["backdoored"]["validation_accuracy"], args.tolerance)
                picks.append(_row(runs, attack, s, method, rho))
            by_rule2[method] = _picked(picks)
            curves[method] = [{"reserve_ratio": r,
                               **{k: _mean_sd(_row(runs, attack, s, method, r)[k] for s in seeds)
                                  for k in ("cacc", "asr", "validation_accuracy", "finetune_step_chosen")}}
                              for r in grid]
        ref_asr = _mean_sd(models[s]["clean_trained"]["asr"] for s in seeds)
        bd_cacc = _mean_sd(models[s]["backdoored"]["cacc"] for s in seeds)

        def targets(chosen):
            fp = chosen["fine_purifying"]
            return {
                "asr_within_10_points_of_clean_trained": fp["asr"]["mean"] <= ref_asr["mean"] + 0.10,
                "asr_excess_points": 100 * (fp["asr"]["mean"] - ref_asr["mean"]),
                "cacc_within_3_points_of_backdoored": fp["cacc"]["mean"] >= bd_cacc["mean"] - 0.03,
                "cacc_drop_points": 100 * (bd_cacc["mean"] - fp["cacc"]["mean"]),
                "against": {m: {"lower_asr": fp["asr"]["mean"] < chosen[m]["asr"]["mean"],
                                "cacc_at_least": fp["cacc"]["mean"] >= chosen[m]["cacc"]["mean"],
                                "asr_gap_points": 100 * (chosen[m]["asr"]["mean"] - fp["asr"]["mean"]),
                                "cacc_gap_points": 100 * (fp["cacc"]["mean"] - chosen[m]["cacc"]["mean"])}
                            for m in ("fine_mixing", "magnitude", "clean_ft", "no_hessian")},
            }

        summary[attack] = {
            "seeds": seeds,
            "backdoored": {k: _mean_sd(models[s]["backdoored"][k] for s in seeds) for k in ("cacc", "asr")},
            "clean_trained": {k: _mean_sd(models[s]["clean_trained"][k] for s in seeds) for k in ("cacc", "asr")},
            "default_configuration": by_default,
            "rule1_default_pooled_validation": by_rule1,
            "rule2_auto_per_model": by_rule2,
            "curves": curves,
            # Context only, never a choice: which rho of each curve meets both targets on the test set.
            "test_oracle_rhos_meeting_both_targets": {
                m: [p["reserve_ratio"] for p in curves[m]
                    if p["asr"]["mean"] <= ref_asr["mean"] + 0.10 and p["cacc"]["mean"] >= bd_cacc["mean"] - 0.03]
                for m in curves},
            "targets_default_configuration": targets(by_default),
            "targets_rule1": targets(by_rule1),
            "targets_rule2": targets(by_rule2),
        }
    return summary


def plot_curves(summary, out_dir):
    from finepurify_ext.plots import _pyplot

    plt = _pyplot()
    paths = []
    for attack, s in summary.items():
        if attack.startswith("_"):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for method in METHODS:
            pts = s["curves"][method]
            ax.errorbar([100 * p["asr"]["mean"] for p in pts], [100 * p["cacc"]["mean"] for p in pts],
                        xerr=[100 * p["asr"]["sd"] for p in pts], yerr=[100 * p["cacc"]["sd"] for p in pts],
                        marker="o", capsize=2, label=LABELS[method])
            for p in pts:
                ax.annotate(f"{p['reserve_ratio']:g}", (100 * p["asr"]["mean"], 100 * p["cacc"]["mean"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(100 * (s["backdoored"]["cacc"]["mean"] - 0.03), color="grey", ls=":", lw=1,
                   label="backdoored CACC - 3")
        ax.axvline(100 * (s["clean_trained"]["asr"]["mean"] + 0.10), color="grey", ls="--", lw=1,
                   label="clean-trained ASR + 10")
        ax.set_xlabel("ASR % (lower is better)")
        ax.set_ylabel("CACC %")
        ax.set_title(f"{attack} trigger: CACC/ASR over the reserve ratio (labels), "
                     f"mean of {len(s['seeds'])} seeds", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"defence_curves_{attack}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(summary):
    if "_default_reserve_ratios" in summary:
        print("rule 1, one rho per method from the pooled validation accuracy: " + "; ".join(
            f"{LABELS[m]} {v['reserve_ratio']:g}" for m, v in summary["_default_reserve_ratios"].items()))
        print("Fine-purifying minus each baseline at the same rho, points, mean±sd over all cells (CACC / ASR):")
        for m, by_rho in summary["_paired_at_equal_rho"].items():
            print(f"  {LABELS[m]:24s} " + "  ".join(
                f"rho {r}: {d['cacc']['mean']:+.1f}±{d['cacc']['sd']:.1f} / {d['asr']['mean']:+.1f}±{d['asr']['sd']:.1f}"
                for r, d in by_rho.items()))
    print(f"\n{'trigger':9s} {'defence':30s} {'rho (per seed)':16s} {'CACC %':>12s} {'ASR %':>12s}")
    for attack, s in summary.items():
        if attack.startswith("_"):
            continue

        def line(label, rho, cacc, asr):
            print(f"{attack:9s} {label:30s} {rho:16s} {100 * cacc['mean']:6.1f}±{100 * cacc['sd']:<4.1f} "
                  f"{100 * asr['mean']:6.1f}±{100 * asr['sd']:<4.1f}")
        line("clean-trained model", "", s["clean_trained"]["cacc"], s["clean_trained"]["asr"])
        line("no defence", "", s["backdoored"]["cacc"], s["backdoored"]["asr"])
        for rule, tag in (("default_configuration", " (default)"), ("rule1_default_pooled_validation", " (rule 1)"),
                          ("rule2_auto_per_model", " (rule 2)")):
            for method in ("clean_ft", "fine_mixing", "magnitude", "no_hessian", "fine_purifying"):
                if rule != "default_configuration" and method == "clean_ft":
                    continue
                c = s[rule][method]
                line(LABELS[method] + tag, ",".join(f"{r:g}" for r in c["reserve_ratio"]), c["cacc"], c["asr"])
        print(f"{attack:9s} rhos meeting both targets on the test set (context, not a choice): "
              + "; ".join(f"{LABELS[m]} {v}" for m, v in s["test_oracle_rhos_meeting_both_targets"].items()))
        for rule in ("default_configuration", "rule1", "rule2"):
            t = s[f"targets_{rule}"]
            print(f"{attack:9s} {rule} targets: ASR {t['asr_excess_points']:+.1f} points over clean-trained (<= 10: "
                  f"{t['asr_within_10_points_of_clean_trained']}), CACC drop against backdoored {t['cacc_drop_points']:+.1f} "
                  f"points (<= 3: {t['cacc_within_3_points_of_backdoored']}); lower ASR than "
                  + ", ".join(f"{LABELS[m]} {v['lower_asr']} ({v['asr_gap_points']:+.1f}) at CACC "
                              f"{v['cacc_gap_points']:+.1f}" for m, v in t["against"].items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=["word", "sentence", "embedding"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--grid", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, "clean_ft"], choices=[*METHODS, "clean_ft"],
                        help="run only these (to share a cell between processes); the summary needs them all")
    parser.add_argument("--validation-fraction", type=float, default=0.25)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--default-rho", type=float, default=0.5,
                        help="the CLI's default reserve ratio, reported as the default configuration (must be in --grid)")
    parser.add_argument("--finetune-steps", type=int, default=150, help="at most (early stopping on the held-out loss)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--merge", nargs="+", default=[],
                        help="also take the runs of these JSON files (same configuration), e.g. from one process per seed")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "defence_table.json"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the demo's tiny QUICK setting (numbers mean nothing)")
    parser.add_argument("--summary-only", action="store_true", help="only summarise the runs already saved")
    args = parser.parse_args(argv)
    os.environ.setdefault("FINEPURIFY_CACHE", os.path.join(os.path.dirname(HERE), ".cache", "finepurify"))

    from finepurify_ext.demo import QUICK, DemoSetting

    config = {k: getattr(args, k) for k in ("grid", "validation_fraction", "tolerance", "finetune_steps", "lr",
                                            "eval_every", "patience", "quick")}
    results = {"runs": {}, "models": {}}
    if os.path.exists(args.out):
        import json

        with open(args.out) as f:
            previous = json.load(f)
        if previous.get("config") == config:
            results["runs"], results["models"] = previous["runs"], previous["models"]
            print(f"resuming: {len(results['runs'])} runs already in {args.out}")
        else:
            print(f"{args.out} was made with another configuration; starting afresh")
    for path in args.merge:
        import json

        with open(path) as f:
            other = json.load(f)
        if other.get("config") != config:
            raise SystemExit(f"{path} was made with another configuration ({other.get('config')}); cannot merge")
        results["runs"].update(other["runs"])
        results["models"].update(other["models"])
        print(f"merged {len(other['runs'])} runs from {path}")
    results.update({
        "command": "python bench/defence_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config, "setting": asdict(QUICK if args.quick else DemoSetting()), "commit": git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "note": "seed s: the backdoored and clean-trained models are trained with seed s, the 256 clean tweets are "
                "split 192/64 with seed s, and clean fine-tuning and Fine-mixing's mask use seed s; the 1000 test "
                "tweets are the same for all. Clean fine-tuning (AdamW, lr `lr`) stops early on the 64 held-out "
                "tweets' loss (measured every `eval_every` steps, `patience` measurements, at most "
                "`finetune_steps`). rho is chosen on the held-out tweets only, by rule 1 (one rho per method for "
                "all cells: the smallest whose mean held-out accuracy drop against the backdoored model is <= "
                "`tolerance`) and rule 2 (the same test per model and seed, as --reserve-ratio auto); rho 1 is "
                "clean fine-tuning alone.",
    })

    def save():
        write_json_atomically(args.out, results)

    start = time.perf_counter()
    if not args.summary_only:
        for seed in args.seeds:  # seed-major: a cut-off run still covers every trigger
            for attack in args.attacks:
                print(f"{attack} trigger, seed {seed}", flush=True)
                measure_cell(attack, seed, args, results, save)
    results["summary"] = summarise(results, args)
    results["plots"] = [os.path.basename(p) for p in plot_curves(results["summary"], os.path.dirname(args.out))]
    results["wall_s_this_invocation"] = time.perf_counter() - start
    save()
    print_table(results["summary"])


if __name__ == "__main__":
    main()
