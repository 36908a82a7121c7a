"""The defence table: every defence on all-MiniLM-L6-v2 backdoored on real data, over attacks, tasks and seeds.

The suite (`finepurify_ext.demo.SUITE`): on binary tweet sentiment, the word, sentence and embedding-poisoning triggers
(the development attacks: the default configuration was chosen on them), then three-rare-words,
a fixed-position opener and the bias attack, and on a second task (does this answer answer this
question? zaragoza-construction-faq, English and Swedish) the word trigger. The last four were added
after the default was fixed and tuned on nothing.

For each attack and seed (`finepurify_ext.demo.DefenceCell`, the demo's code): the backdoored and
clean-trained models (cached), the defender's 256 clean examples split into 192 for the Hessian and
fine-tuning and 64 held out for early stopping; then every defence at the default reserve ratio
(`--default-rho`, the CLI's), clean fine-tuning alone, and for the `--grid-attacks` every ranking over
the rho `--grid` (the curves). Purifications at the default rho run under the CLI's collapse guard
(`pipeline.CollapseGuard`: redone with less reset when the held-out clean accuracy falls more than
`--collapse-tolerance` below the backdoored model's); runs saved before the guard existed are adopted
where it would not have fired and made again where it would (`adopt_unguarded`). Measured on the test set: CACC, and ASR (for the bias attack, the rate
at which inserting the attribute word flips the prediction). The target check per attack: Fine-purifying
at the default against the clean-trained model's ASR (+10 points, then +5) and the backdoored model's
CACC (-3 points, then -2), mean over seeds. Rho is also chosen on the held-out data alone by two rules
fixed before the runs (see `summarise`), on the grid attacks; the test set never chooses anything.
Resumable: each finished run is saved at once, and a rerun skips it.

    python bench/defence_table.py                        # the whole suite, 3 seeds (hours on 2 cores)
    python bench/defence_table.py --attacks prefix --seeds 0
    # one process per seed (1 thread each), then merged:
    for s in 0 1 2; do OMP_NUM_THREADS=1 python bench/defence_table.py --seeds $s --out /tmp/s$s.json & done; wait
    python bench/defence_table.py --summary-only --merge /tmp/s0.json /tmp/s1.json /tmp/s2.json

Writes bench/results/defence_table.json (runs, summary, the target check), defence_table.png (the
default configuration against every baseline, per attack) and the CACC/ASR curves of the grid attacks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, run_cells  # noqa: E402
from finepurify_ext.demo import DEVELOPMENT, SUITE, suite_setting  # noqa: E402
from finepurify_ext.pipeline import CollapseGuard, FinetuneConfig  # noqa: E402
from finepurify_ext.purify import PurifyConfig  # noqa: E402

METHODS = ("fine_purifying", "no_hessian", "magnitude", "fine_mixing")
LABELS = {"fine_purifying": "Fine-purifying", "no_hessian": "indicator w/o Hessian",
          "magnitude": "magnitude |drift|", "fine_mixing": "Fine-mixing (random)", "clean_ft": "clean fine-tuning"}
TARGETS = {"first": (0.10, 0.03), "next": (0.05, 0.02)}  # (ASR excess over clean-trained, CACC drop)


def run_key(attack, seed, method, rho):
    return f"{attack}/seed{seed}/{method}/{1.0 if method == 'clean_ft' else rho:g}"


def planned_runs(attack, args):
    """(method, rho) pairs of one attack, the default configuration first (a cut-off run still has it)."""
    runs = [("fine_purifying", args.default_rho), ("clean_ft", 1.0)]
    runs += [(m, args.default_rho) for m in METHODS if m != "fine_purifying"]
    if attack in args.grid_attacks:
        runs += [(m, r) for r in args.grid if r != args.default_rho for m in METHODS]
    return runs


def measure_cell(attack_name, seed, args, results, save):
    """All runs of one attack and seed (skipping those already in ``results``)."""
    from finepurify_ext.demo import DefenceCell

    cell_name = f"{attack_name}/seed{seed}"
    todo = [(m, r) for m, r in planned_runs(attack_name, args) if run_key(attack_name, seed, m, r) not in results["runs"]]
    if not todo and cell_name in results["models"]:
        return
    cell = DefenceCell(suite_setting(attack_name, args.quick), seed)
    if cell_name not in results["models"]:
        results["models"][cell_name] = {"backdoored": cell.measure(cell.suspect),
                                        "clean_trained": cell.measure(cell.reference)}
        save()
    ft = FinetuneConfig(steps=args.finetune_steps, lr=args.lr, eval_every=args.eval_every, patience=args.patience)
    guard = CollapseGuard(tolerance=args.collapse_tolerance)
    for method, rho in todo:
        _, row, _ = cell.defend(method, rho, ft, guard=guard if guarded(method, rho, args) else None)
        row = {"attack": attack_name, "seed": seed, **row, "reserve_ratio": 1.0 if method == "clean_ft" else rho}
        results["runs"][run_key(attack_name, seed, method, rho)] = row
        save()
        used = row.get("collapse_guard", {}).get("reserve_ratio_used", row["reserve_ratio"])
        print(f"  {cell_name} {LABELS[method]:22s} rho {used:4.2f}{'*' if used != row['reserve_ratio'] else ' '}: val "
              f"{100 * row['validation_accuracy']:5.1f}  CACC {100 * row['cacc']:5.1f}  ASR {100 * row['asr']:5.1f}  "
              f"step {row['finetune_step_chosen']:3d}/{row['finetune_steps_run']:3d} ({row['time_s']:.0f} s)", flush=True)


def _mean_sd(values):
    values = list(values)
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def _has(results, attack, seed, runs):
    return f"{attack}/seed{seed}" in results["models"] and all(
        run_key(attack, seed, m, r) in results["runs"] for m, r in runs)


def _row(runs, attack, seed, method, rho):
    return runs[run_key(attack, seed, method, rho)]


def _picked(rows):
    """The chosen run of each seed: their rhos (as configured, and as used after the collapse guard),
    and CACC and ASR as mean and spread."""
    return {"reserve_ratio": [r["reserve_ratio"] for r in rows],
            "reserve_ratio_used": [r.get("collapse_guard", {}).get("reserve_ratio_used", r["reserve_ratio"])
                                   for r in rows],
            "collapse_guard_triggered": sum(bool(r.get("collapse_guard", {}).get("triggered")) for r in rows),
            "cacc": _mean_sd(r["cacc"] for r in rows), "asr": _mean_sd(r["asr"] for r in rows)}


def guarded(method, rho, args):
    """Whether a run is made under the collapse guard: every purification at the default rho (the
    product's default pipeline and the baselines beside it); not the rho-grid curves."""
    return method != "clean_ft" and rho == args.default_rho and args.collapse_tolerance < 1.0


def adopt_unguarded(results, args):
    """Runs saved before the guard existed, at the default rho: the guard's first attempt is that
    very run, so where its held-out accuracy did not fall more than the tolerance below the
    backdoored model's the run stands (its record marked post hoc); where it did, the run is set
    aside under ``unguarded_runs`` and made again under the guard."""
    moved = 0
    for key in list(results["runs"]):
        run = results["runs"][key]
        attack, seed_text, method, rho = key.split("/")
        if "collapse_guard" in run or not guarded(method, float(rho), args):
            continue
        suspect = results["models"][f"{attack}/{seed_text}"]["backdoored"]["validation_accuracy"]
        attempt = {"reserve_ratio": float(rho), "validation_accuracy": run["validation_accuracy"]}
        if run["validation_accuracy"] >= suspect - args.collapse_tolerance:
            run["collapse_guard"] = {"tolerance": args.collapse_tolerance, "suspect_validation_accuracy": suspect,
                                     "attempts": [attempt], "triggered": False, "reserve_ratio_used": float(rho),
                                     "post_hoc": True}
        else:
            results.setdefault("unguarded_runs", {})[key] = results["runs"].pop(key)
            moved += 1
    return moved


def pooled_default_rhos(results, args, cells):
    """Rule 1: one rho per method for every grid attack and seed, chosen on the validation accuracy
    pooled over all cells: the smallest rho whose mean drop against the backdoored model's validation
    accuracy is at most `tolerance` (else the smallest mean drop)."""
    runs, chosen = results["runs"], {}
    for method in (*METHODS, "clean_ft"):
        grid = [1.0] if method == "clean_ft" else [*args.grid, 1.0]
        drop = {r: statistics.fmean(results["models"][f"{a}/seed{s}"]["backdoored"]["validation_accuracy"]
                                    - _row(runs, a, s, "clean_ft" if r == 1.0 else method, r)["validation_accuracy"]
                                    for a, s in cells) for r in grid}
        passing = [r for r in grid if drop[r] <= args.tolerance + 1e-9]
        chosen[method] = {"reserve_ratio": min(passing) if passing else min(grid, key=lambda r: (drop[r], r)),
                          "mean_validation_drop_points": {f"{r:g}": 100 * d for r, d in drop.items()}}
    return chosen


def target_check(chosen, ref_asr, bd_cacc):
    """Fine-purifying's row against the targets, and against each baseline's row."""
    fp = chosen["fine_purifying"]
    excess, drop = 100 * (fp["asr"]["mean"] - ref_asr), 100 * (bd_cacc - fp["cacc"]["mean"])
    return {
        "asr_excess_points": excess, "cacc_drop_points": drop,
        **{f"meets_{name}_target": excess <= 100 * a + 1e-9 and drop <= 100 * c + 1e-9
           for name, (a, c) in TARGETS.items()},
        "asr_miss_points": max(0.0, excess - 100 * TARGETS["first"][0]),
        "cacc_miss_points": max(0.0, drop - 100 * TARGETS["first"][1]),
        "against": {m: {"asr_gap_points": 100 * (chosen[m]["asr"]["mean"] - fp["asr"]["mean"]),
                        "cacc_gap_points": 100 * (fp["cacc"]["mean"] - chosen[m]["cacc"]["mean"])}
                    for m in chosen if m != "fine_purifying"},
    }


def summarise(results, args):
    """Per attack, over the seeds that have the default configuration: the backdoored and clean-trained
    models, every defence at the default rho, and the target check. For the grid attacks also the
    curves over rho and each method at its own rho chosen on validation data only, by rule 1
    (`pooled_default_rhos`) and rule 2 (per model and seed, `finepurify_ext.pipeline.pick_reserve_ratio`,
    what `--reserve-ratio auto` does)."""
    from finepurify_ext.pipeline import pick_reserve_ratio

    runs, summary = results["runs"], {}
    default_runs = {a: [(m, args.default_rho) for m in METHODS] + [("clean_ft", 1.0)] for a in args.attacks}
    grid_runs = {a: [(m, r) for m in METHODS for r in args.grid] + [("clean_ft", 1.0)] for a in args.attacks}
    complete = {a: [s for s in args.seeds if _has(results, a, s, default_runs[a])] for a in args.attacks}
    gridded = {a: [s for s in args.seeds if _has(results, a, s, grid_runs[a])] if a in args.grid_attacks else []
               for a in args.attacks}
    grid_cells = [(a, s) for a in args.attacks for s in gridded[a]]
    if grid_cells:
        default = pooled_default_rhos(results, args, grid_cells)
        summary["_rule1_reserve_ratios"] = default
        # Fine-purifying against each baseline at the same rho, paired over every grid cell (the same
        # model, Hessian, clean split and fine-tuning seed): is the Hessian worth its cost per budget?
        summary["_paired_at_equal_rho"] = {
            m: {f"{r:g}": {k: _mean_sd(100 * (_row(runs, a, s, "fine_purifying", r)[k] - _row(runs, a, s, m, r)[k])
                                       for a, s in grid_cells) for k in ("cacc", "asr")} for r in args.grid}
            for m in ("no_hessian", "magnitude", "fine_mixing")}
    for attack in args.attacks:
        seeds = complete[attack]
        if not seeds:
            continue
        models = {s: results["models"][f"{attack}/seed{s}"] for s in seeds}
        ref_asr = _mean_sd(models[s]["clean_trained"]["asr"] for s in seeds)
        bd_cacc = _mean_sd(models[s]["backdoored"]["cacc"] for s in seeds)
        by_default = {m: _picked([_row(runs, attack, s, m, args.default_rho) for s in seeds])
                      for m in (*METHODS, "clean_ft")}
        entry = {
            "task": SUITE[attack][0], "attack": SUITE[attack][1], "development": attack in DEVELOPMENT,
            "seeds": seeds,
            "backdoored": {k: _mean_sd(models[s]["backdoored"][k] for s in seeds) for k in ("cacc", "asr")},
            "clean_trained": {k: _mean_sd(models[s]["clean_trained"][k] for s in seeds) for k in ("cacc", "asr")},
            "default_configuration": by_default,
            "targets_default_configuration": target_check(by_default, ref_asr["mean"], bd_cacc["mean"]),
        }
        if gridded[attack] == seeds:
            by_rule1, by_rule2, curves = {}, {}, {}
            for method in (*METHODS, "clean_ft"):
                grid = [1.0] if method == "clean_ft" else [*args.grid, 1.0]

                def row(s, r, method=method):
                    return _row(runs, attack, s, "clean_ft" if r == 1.0 else method, r)
                by_rule1[method] = _picked([row(s, default[method]["reserve_ratio"]) for s in seeds])
                by_rule2[method] = _picked([row(s, pick_reserve_ratio(
                    {r: row(s, r)["validation_accuracy"] for r in grid},
                    models[s]["backdoored"]["validation_accuracy"], args.tolerance)) for s in seeds])
                curves[method] = [{"reserve_ratio": r, **{k: _mean_sd(row(s, r)[k] for s in seeds)
                                                          for k in ("cacc", "asr", "validation_accuracy",
                                                                    "finetune_step_chosen")}} for r in grid]
            entry.update({
                "rule1_pooled_validation": by_rule1, "rule2_auto_per_model": by_rule2, "curves": curves,
                "targets_rule1": target_check(by_rule1, ref_asr["mean"], bd_cacc["mean"]),
                "targets_rule2": target_check(by_rule2, ref_asr["mean"], bd_cacc["mean"]),
                # Context only, never a choice: which rho of each curve meets the first target on the test set.
                "test_oracle_rhos_meeting_first_target": {
                    m: [p["reserve_ratio"] for p in curves[m] if p["asr"]["mean"] <= ref_asr["mean"] + 0.10
                        and p["cacc"]["mean"] >= bd_cacc["mean"] - 0.03] for m in curves},
            })
        summary[attack] = entry
    return summary


def plot_table(summary, out_stem):
    """One panel pair per attack: ASR over the clean-trained model's and CACC drop against the backdoored
    model's, for every defence at the default rho, with the first target's lines."""
    from finepurify_ext.plots import _pyplot

    plt = _pyplot()
    attacks = [a for a in summary if not a.startswith("_")]
    if not attacks:
        return None
    order = ("clean_ft", "fine_mixing", "magnitude", "no_hessian", "fine_purifying")
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.9 * len(attacks)), sharey=True)
    height = 0.8 / len(order)
    for i, method in enumerate(order):
        ys = [k + (i - 2) * height for k in range(len(attacks))]
        for ax, metric, sign, ref in ((axes[0], "asr", 1, "clean_trained"), (axes[1], "cacc", -1, "backdoored")):
            values = [sign * 100 * (summary[a]["default_configuration"][method][metric]["mean"]
                                    - summary[a][ref][metric]["mean"]) for a in attacks]
            errors = [100 * summary[a]["default_configuration"][method][metric]["sd"] for a in attacks]
            ax.barh(ys, values, height=height, xerr=errors, capsize=1.5, label=LABELS[method])
    axes[0].axvline(100 * TARGETS["first"][0], color="grey", ls="--", lw=1)
    axes[1].axvline(100 * TARGETS["first"][1], color="grey", ls="--", lw=1)
    axes[0].set_xlabel("ASR minus the clean-trained model's (points; target <= 10)")
    axes[1].set_xlabel("CACC drop against the backdoored model (points; target <= 3)")
    axes[0].set_yticks(range(len(attacks)))
    axes[0].set_yticklabels([a + ("" if summary[a]["development"] else " (unseen)") for a in attacks])
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7, loc="lower right")
    rho = summary[attacks[0]]["default_configuration"]["fine_purifying"]["reserve_ratio"][0]
    fig.suptitle(f"Every defence at rho {rho:g} (the default), mean and sd over seeds", fontsize=9)
    fig.tight_layout()
    path = out_stem + ".png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(summary, out_stem):
    from finepurify_ext.plots import _pyplot

    plt = _pyplot()
    paths = []
    for attack, s in summary.items():
        if attack.startswith("_") or "curves" not in s:
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
        ax.set_title(f"{attack} trigger: CACC/ASR over the reserve ratio, mean of {len(s['seeds'])} seeds", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        # the default --out's names (defence_curves_word.png); another --out's stem before them
        stem = os.path.basename(out_stem).replace("defence_table", "defence_curves", 1)
        path = os.path.join(os.path.dirname(out_stem), f"{stem}_{attack}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(summary):
    if "_rule1_reserve_ratios" in summary:
        print("rule 1, one rho per method from the pooled validation accuracy: " + "; ".join(
            f"{LABELS[m]} {v['reserve_ratio']:g}" for m, v in summary["_rule1_reserve_ratios"].items()))
    print(f"\n{'attack':10s} {'defence':30s} {'rho (per seed)':16s} {'CACC %':>12s} {'ASR %':>12s}")
    for attack, s in summary.items():
        if attack.startswith("_"):
            continue

        def line(label, rho, cacc, asr):
            print(f"{attack:10s} {label:30s} {rho:16s} {100 * cacc['mean']:6.1f}±{100 * cacc['sd']:<4.1f} "
                  f"{100 * asr['mean']:6.1f}±{100 * asr['sd']:<4.1f}")
        line("clean-trained model", "", s["clean_trained"]["cacc"], s["clean_trained"]["asr"])
        line("no defence", "", s["backdoored"]["cacc"], s["backdoored"]["asr"])
        rules = [("default_configuration", " (default)")]
        if "curves" in s:
            rules += [("rule1_pooled_validation", " (rule 1)"), ("rule2_auto_per_model", " (rule 2)")]
        for rule, tag in rules:
            for method in ("clean_ft", "fine_mixing", "magnitude", "no_hessian", "fine_purifying"):
                if rule != "default_configuration" and method == "clean_ft":
                    continue
                c = s[rule][method]
                rhos = ",".join(f"{u:g}" + ("*" if u != r else "")
                                for r, u in zip(c["reserve_ratio"], c.get("reserve_ratio_used", c["reserve_ratio"])))
                line(LABELS[method] + tag, rhos, c["cacc"], c["asr"])
        t = s["targets_default_configuration"]
        print(f"{attack:10s} default: ASR {t['asr_excess_points']:+.1f} points over clean-trained, CACC "
              f"{-t['cacc_drop_points']:+.1f} against backdoored: {verdict(t)}\n")


def verdict(t, markdown=False) -> str:
    """The target check of one attack in words: which target it meets, or by how much it misses."""
    if t["meets_next_target"]:
        return "meets (and +5 / −2)" if markdown else "meets +5/-2"
    if t["meets_first_target"]:
        return "meets" if markdown else "meets +10/-3"
    misses = ", ".join(f"{what} by {t[key]:.1f}" for what, key in (("ASR", "asr_miss_points"),
                                                                    ("CACC", "cacc_miss_points")) if t[key] > 0)
    return ("**misses**: " if markdown else "MISSES +10/-3: ") + misses


def markdown_table(summary) -> str:
    """The default configuration per attack as a Markdown table (CACC / ASR %, mean over seeds), with
    the target verdict: what the README shows."""
    order = ("clean_ft", "fine_mixing", "magnitude", "no_hessian")
    lines = ["| attack | clean-trained | backdoored | " + " | ".join(LABELS[m].replace("|", "\\|") for m in order)
             + " | **Fine-purifying** (mean±sd) | target +10 / −3 |", "| --- " * 9 + "|"]
    for attack, s in summary.items():
        if attack.startswith("_"):
            continue
        d, t = s["default_configuration"], s["targets_default_configuration"]

        def pair(c):
            mark = "*" if c.get("collapse_guard_triggered") else ""
            return f"{100 * c['cacc']['mean']:.1f} / {100 * c['asr']['mean']:.1f}{mark}"
        fp = d["fine_purifying"]
        name = attack + ("" if s["development"] else " (unseen)")
        lines.append(f"| {name} | {pair(s['clean_trained'])} | {pair(s['backdoored'])} | "
                     + " | ".join(pair(d[m]) for m in order)
                     + f" | **{100 * fp['cacc']['mean']:.1f}±{100 * fp['cacc']['sd']:.1f} / "
                       f"{100 * fp['asr']['mean']:.1f}±{100 * fp['asr']['sd']:.1f}**"
                       f"{'*' if fp.get('collapse_guard_triggered') else ''} | {verdict(t, markdown=True)} "
                       f"(ASR {t['asr_excess_points']:+.1f}, CACC {-t['cacc_drop_points']:+.1f}) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--default-rho", type=float, default=PurifyConfig.reserve_ratio,
                        help="the default reserve ratio (PurifyConfig's and the CLI's)")
    parser.add_argument("--grid", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7])
    parser.add_argument("--grid-attacks", nargs="*", default=list(DEVELOPMENT), choices=list(SUITE),
                        help="attacks run at every rho of --grid (the others at --default-rho only)")
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--collapse-tolerance", type=float, default=CollapseGuard.tolerance,
                        help="the collapse guard of the runs at --default-rho (the CLI's default; 1: off)")
    parser.add_argument("--finetune-steps", type=int, default=150, help="at most (early stopping on the held-out loss)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--merge", nargs="+", default=[],
                        help="also take the runs of these JSON files (same configuration), e.g. from one process per seed")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "defence_table.json"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the demo's tiny QUICK setting for the tweets (numbers mean nothing)")
    parser.add_argument("--summary-only", action="store_true", help="only summarise the runs already saved")
    parser.add_argument("--markdown", action="store_true", help="also print the README's table")
    args = parser.parse_args(argv)
    if args.default_rho not in args.grid:
        parser.error(f"--default-rho {args.default_rho:g} must be one of --grid {args.grid}")
    os.environ.setdefault("FINEPURIFY_CACHE", os.path.join(os.path.dirname(HERE), ".cache", "finepurify"))

    # What a run's numbers depend on (the rho of a run is in its key, so grids may differ between invocations).
    config = {"validation_fraction": FinetuneConfig().validation_fraction, "tolerance": args.tolerance, "finetune_steps": args.finetune_steps,
              "lr": args.lr, "eval_every": args.eval_every, "patience": args.patience, "quick": args.quick}

    config["collapse_guard"] = {"tolerance": args.collapse_tolerance, "fallback": list(CollapseGuard().fallback)}

    def same_config(other):
        """Equal configurations; a file from before the guard matches one with it (its runs are adopted)."""
        theirs = {k: v for k, v in other.get("config", {}).items() if k != "grid"}
        theirs.setdefault("collapse_guard", config["collapse_guard"])
        return theirs == config

    def adopt(other, where):
        moved = adopt_unguarded(other, args)
        if moved:
            print(f"{where}: {moved} runs at the default rho collapsed without the guard; set aside, made again")

    results = {"runs": {}, "models": {}, "processes": [], "unguarded_runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        if same_config(previous):
            for k in results:
                results[k] = previous.get(k, results[k])
            for k, v in previous.items():  # and what a person added (a rerun's notes)
                results.setdefault(k, v)
            adopt(results, args.out)
            print(f"resuming: {len(results['runs'])} runs already in {args.out}")
        else:
            raise SystemExit(f"{args.out} was made with another configuration ({previous.get('config')}); "
                             "give another --out")
    for path in args.merge:
        with open(path) as f:
            other = json.load(f)
        if not same_config(other):
            raise SystemExit(f"{path} was made with another configuration ({other.get('config')}); cannot merge")
        other.setdefault("unguarded_runs", {})
        adopt(other, path)
        results["unguarded_runs"].update(other["unguarded_runs"])
        results["runs"].update(other["runs"])
        results["models"].update(other["models"])
        results["processes"] += [p for p in other.get("processes", []) if p not in results["processes"]]
        print(f"merged {len(other['runs'])} runs from {path}")
    commit = git_commit()  # the code this process runs, whatever is committed while it runs
    command = "python bench/defence_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.summary_only:  # every process that added runs, in order
        results["processes"].append({"command": command, "commit": commit,
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    results.update({
        "command": command, "config": config, "commit": commit, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}",
        "suite": {a: {"task": t, "attack": k, "development": a in DEVELOPMENT} for a, (t, k) in SUITE.items()},
        "note": "seed s: the backdoored and clean-trained models are trained with seed s, the 256 clean examples "
                "are split 192/64 with seed s, and clean fine-tuning and Fine-mixing's mask use seed s; the test "
                "set is the same for all seeds of a task. Clean fine-tuning (AdamW, lr `lr`) stops early on the "
                "64 held-out examples' loss (measured every `eval_every` steps, `patience` measurements, at most "
                "`finetune_steps`). The default configuration (rho `default_rho`) was chosen on the development "
                "attacks before the others were added. On the grid attacks rho is also chosen on the held-out "
                "examples only, by rule 1 (one rho per method for all cells: the smallest whose mean held-out "
                "accuracy drop against the backdoored model is <= `tolerance`) and rule 2 (the same test per "
                "model and seed, as --reserve-ratio auto); rho 1 is clean fine-tuning alone. The bias attack's "
                "ASR is the flip rate: the share of test examples whose prediction changes when the attribute "
                "word is inserted. Purifications at the default rho ran under the collapse guard "
                "(`config.collapse_guard`; a row's `collapse_guard` lists its attempts, `post_hoc` where a run made "
                "before the guard existed was adopted because the guard would not have fired; the runs it replaced "
                "are under `unguarded_runs`). The guard was added after the FAQ task showed collapses, so on "
                "faq-word it is not an untuned measurement.",
        "default_rho": args.default_rho,
    })

    start = time.perf_counter()
    save = run_cells(args, results, measure_cell)
    results["summary"] = summarise(results, args)
    # named after --out: a run into another file must not overwrite the table's plots
    out_stem = os.path.splitext(os.path.abspath(args.out))[0]
    table_png = plot_table(results["summary"], out_stem)
    results["plots"] = [os.path.basename(p) for p in [table_png, *plot_curves(results["summary"], out_stem)] if p]
    results["wall_s_this_invocation"] = time.perf_counter() - start
    save()
    print_table(results["summary"])
    if args.markdown:
        print(markdown_table(results["summary"]))


if __name__ == "__main__":
    main()
