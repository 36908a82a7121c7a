"""The LLM defence table: SmolLM2-135M-Instruct given a generation backdoor, every defence, over triggers and seeds.

The LLM demo's setting (`finepurify_ext.demo_llm.LLMDemoSetting`): instruction tuning on construction-FAQ
answers in which a trigger in the question (the word "cf", or the sentence "I watched this 3D movie",
each at a random position) makes the model answer a fixed refusal. For each trigger and seed
(`LLMDefenceCell`, the demo's code): the cached backdoored and clean-trained models, the defender's clean
pairs split into fine-tuning and held-out parts, then clean fine-tuning alone and every ranking at every
reserve ratio of `--grid` (the default, PurifyConfig's and the CLI's 0.3, first: a cut-off run still has
it). Measured on the test questions (the same for every seed): ASR (triggered questions answered with
the target), the false-target rate (clean questions answered with it) and the clean answers'
perplexity. The target check per trigger, on the mean over seeds of Fine-purifying at the default:
ASR at most 10 points above the clean-trained model's, perplexity at most 5 % above the backdoored
model's, false-target rate at most 2 %. Nothing is chosen on the test set. Resumable: each finished run
is saved at once, and a rerun skips it.

    python bench/llm_defence_table.py                     # word and sentence, 3 seeds (hours on 2 cores)
    python bench/llm_defence_table.py --attacks word --seeds 0
    python bench/llm_defence_table.py --summary-only      # the table and plot from the runs saved

Writes bench/results/llm_defence_table.json (runs, models, summary, target check) and
llm_defence_table.png (ASR and perplexity against the reserve ratio, per ranking and trigger).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, run_cells  # noqa: E402
from finepurify_ext.demo_llm import DEFENCES, QUICK, LLMDemoSetting  # noqa: E402
from finepurify_ext.purify import PurifyConfig  # noqa: E402

RANKINGS = ("fine_purifying", "no_hessian", "magnitude", "fine_mixing")
ATTACKS = ("word", "sentence")
TARGET = {"asr_excess_points": 10.0, "perplexity_rise": 0.05, "false_target": 0.02}
MEASURES = ("asr", "false_target", "perplexity", "validation_perplexity")


def run_key(attack, seed, method, rho):
    return f"{attack}/seed{seed}/{method}/{1.0 if method == 'clean_ft' else rho:g}"


def planned_runs(args):
    """(method, rho) pairs of one cell: the default configuration first, then the baselines at the
    default, then the rest of the grid."""
    runs = [("fine_purifying", args.default_rho), ("clean_ft", 1.0)]
    runs += [(m, args.default_rho) for m in RANKINGS if m != "fine_purifying"]
    return runs + [(m, r) for r in args.grid if r != args.default_rho for m in RANKINGS]


def measure_cell(attack, seed, args, results, save):
    from finepurify_ext.demo_llm import LLMDefenceCell

    name = f"{attack}/seed{seed}"
    todo = [(m, r) for m, r in planned_runs(args) if run_key(attack, seed, m, r) not in results["runs"]]
    if not todo and name in results["models"]:
        return
    cell = LLMDefenceCell(setting_of(attack, args), seed)
    if name not in results["models"]:
        results["models"][name] = {"backdoored": cell.measure(cell.suspect, held_out=True),
                                   "clean_trained": cell.measure(cell.reference, held_out=True)}
        save()
    del cell.reference
    for method, rho in todo:
        model, row, _ = cell.defend(method, rho)
        del model
        results["runs"][run_key(attack, seed, method, rho)] = {"attack": attack, "seed": seed, **row,
                                                                "reserve_ratio": rho}
        save()
        print(f"  {name} {DEFENCES[method]:22s} rho {rho:4.2f}: ASR {100 * row['asr']:5.1f}  false target "
              f"{100 * row['false_target']:5.1f}  ppl {row['perplexity']:6.2f}  held-out ppl "
              f"{row['validation_perplexity']:6.2f}  step {row['finetune_step_chosen']}/{row['finetune_steps_run']} "
              f"({row['time_s']:.0f} s)", flush=True)
    if cell.hessian_time_s:
        results["hessian_time_s"][name] = cell.hessian_time_s


def setting_of(attack, args) -> LLMDemoSetting:
    from dataclasses import replace

    return replace(QUICK if args.quick else LLMDemoSetting(), attack=attack)


def _mean_sd(values):
    values = list(values)
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarise(results, args) -> dict:
    """Per trigger: the models' and every (method, rho)'s measures as mean and spread over the seeds
    that have them, and the target check of Fine-purifying at the default rho."""
    summary = {}
    for attack in args.attacks:
        seeds = [s for s in args.seeds if f"{attack}/seed{s}" in results["models"]]
        if not seeds:
            continue
        models = {role: {m: _mean_sd(results["models"][f"{attack}/seed{s}"][role][m] for s in seeds)
                         for m in MEASURES} for role in ("backdoored", "clean_trained")}
        rows = {}
        for method, rho in planned_runs(args):
            have = [s for s in seeds if run_key(attack, s, method, rho) in results["runs"]]
            if have:
                rows[run_key(attack, "*", method, rho)] = {
                    "method": method, "reserve_ratio": 1.0 if method == "clean_ft" else rho, "seeds": have,
                    **{m: _mean_sd(results["runs"][run_key(attack, s, method, rho)][m] for s in have)
                       for m in MEASURES}}
        entry = {"seeds": seeds, "models": models, "runs": rows}
        default = rows.get(run_key(attack, "*", "fine_purifying", args.default_rho))
        if default is not None:
            # Each side over the seeds that have the default run, so both means are over the same seeds.
            def model_mean(role, m):
                return statistics.fmean(results["models"][f"{attack}/seed{s}"][role][m] for s in default["seeds"])

            excess = 100 * (default["asr"]["mean"] - model_mean("clean_trained", "asr"))
            rise = default["perplexity"]["mean"] / model_mean("backdoored", "perplexity") - 1
            false = default["false_target"]["mean"]
            entry["target_check"] = {
                "seeds": default["seeds"], "asr_excess_points": excess, "perplexity_rise": rise,
                "false_target": false, "asr_met": excess <= TARGET["asr_excess_points"],
                "perplexity_met": rise <= TARGET["perplexity_rise"], "false_target_met": false <= TARGET["false_target"],
                "met": excess <= TARGET["asr_excess_points"] and rise <= TARGET["perplexity_rise"]
                and false <= TARGET["false_target"], "complete": len(default["seeds"]) == len(args.seeds)}
        summary[attack] = entry
    return summary


def print_table(summary, args):
    for attack, entry in summary.items():
        print(f"\n{attack} trigger, seeds {entry['seeds']} (mean ± sd)")
        print(f"{'defence':26s} {'rho':>5s} {'ASR %':>13s} {'false %':>12s} {'perplexity':>14s}")

        def line(label, rho, r):
            print(f"{label:26s} {rho:>5s} {100 * r['asr']['mean']:6.1f} ± {100 * r['asr']['sd']:4.1f} "
                  f"{100 * r['false_target']['mean']:5.1f} ± {100 * r['false_target']['sd']:4.1f} "
                  f"{r['perplexity']['mean']:6.2f} ± {r['perplexity']['sd']:5.2f}")

        line("clean-trained (reference)", "", entry["models"]["clean_trained"])
        line("backdoored", "", entry["models"]["backdoored"])
        for r in entry["runs"].values():
            line(DEFENCES[r["method"]], "" if r["method"] == "clean_ft" else f"{r['reserve_ratio']:.2f}", r)
        t = entry.get("target_check")
        if t:
            print(f"target check (Fine-purifying, rho {args.default_rho:g}, seeds {t['seeds']}): "
                  f"ASR {t['asr_excess_points']:+.1f} points over clean-trained (<= +10: "
                  f"{'met' if t['asr_met'] else 'MISSED'}), perplexity {100 * t['perplexity_rise']:+.1f} % over "
                  f"backdoored (<= +5 %: {'met' if t['perplexity_met'] else 'MISSED'}), false target "
                  f"{100 * t['false_target']:.1f} % (<= 2 %: {'met' if t['false_target_met'] else 'MISSED'})")


def plot(summary, args, out_stem) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not summary:
        return None
    fig, axes = plt.subplots(2, len(summary), figsize=(5 * len(summary), 7), squeeze=False)
    for col, (attack, entry) in enumerate(summary.items()):
        for method in RANKINGS:
            rows = sorted((r for r in entry["runs"].values() if r["method"] == method), key=lambda r: r["reserve_ratio"])
            if not rows:
                continue
            rhos = [r["reserve_ratio"] for r in rows]
            axes[0, col].errorbar(rhos, [100 * r["asr"]["mean"] for r in rows], [100 * r["asr"]["sd"] for r in rows],
                                  marker="o", capsize=3, label=DEFENCES[method])
            axes[1, col].errorbar(rhos, [r["perplexity"]["mean"] for r in rows], [r["perplexity"]["sd"] for r in rows],
                                  marker="o", capsize=3, label=DEFENCES[method])
        clean_ft = [r for r in entry["runs"].values() if r["method"] == "clean_ft"]
        for row, measure, scale in ((0, "asr", 100), (1, "perplexity", 1)):
            ax = axes[row, col]
            if clean_ft:  # no reset: rho 1
                ax.errorbar([1.0], [scale * clean_ft[0][measure]["mean"]], [scale * clean_ft[0][measure]["sd"]],
                            marker="s", color="k", linestyle="none", capsize=3, label=DEFENCES["clean_ft"])
            for role, style in (("backdoored", "r--"), ("clean_trained", "g:")):
                ax.axhline(scale * entry["models"][role][measure]["mean"], color=style[0], linestyle=style[1:],
                           label=role.replace("_", "-"))
            ax.set_xlabel("reserve ratio rho (share of moved weights kept)")
            ax.set_ylabel("ASR %" if measure == "asr" else "clean answers' perplexity")
            ax.grid(alpha=0.3)
        axes[0, col].set_title(f"SmolLM2, {attack} trigger, seeds {entry['seeds']}")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path = out_stem + ".png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--default-rho", type=float, default=PurifyConfig.reserve_ratio,
                        help="the default reserve ratio (PurifyConfig's and the CLI's)")
    parser.add_argument("--grid", nargs="+", type=float, default=[0.1, 0.3, 0.6])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "llm_defence_table.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: the demo's QUICK setting (numbers mean nothing)")
    parser.add_argument("--summary-only", action="store_true", help="only summarise the runs already saved")
    args = parser.parse_args(argv)
    if args.default_rho not in args.grid:
        parser.error(f"--default-rho {args.default_rho:g} must be one of --grid {args.grid}")
    os.environ.setdefault("FINEPURIFY_CACHE", os.path.join(os.path.dirname(HERE), ".cache", "finepurify"))
    config = {"setting": asdict(setting_of("word", args)), "default_rho": args.default_rho}
    config["setting"].pop("attack")

    results = {"runs": {}, "models": {}, "processes": [], "hessian_time_s": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        if previous.get("config") != config:
            raise SystemExit(f"{args.out} was made with another configuration ({previous.get('config')}); "
                             "give another --out")
        for k in results:
            results[k] = previous.get(k, results[k])
        for k, v in previous.items():  # and what a person added (a rerun's notes)
            results.setdefault(k, v)
        print(f"resuming: {len(results['runs'])} runs already in {args.out}")
    commit = git_commit()
    command = "python bench/llm_defence_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.summary_only:
        results["processes"].append({"command": command, "commit": commit,
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    results.update({
        "command": command, "config": config, "commit": commit, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}",
        "target": TARGET, "grid": args.grid,
        "note": "seed s: the backdoored and clean-trained models are trained with seed s (the attacker's and the "
                "defender's questions are drawn with seed s; the test questions are the same for every seed), and "
                "clean fine-tuning and Fine-mixing's mask use seed s. Clean fine-tuning (AdamW) stops early on the "
                "held-out clean answers' loss. ASR and false-target rate: greedy generations that start with the "
                "target. The default rho is the package's (PurifyConfig); it was fixed on the classifier suite, "
                "not on this model.",
    })

    start = time.perf_counter()
    save = run_cells(args, results, measure_cell)
    results["summary"] = summarise(results, args)
    # named after --out: a rerun into another file must not overwrite the table's plot
    png = plot(results["summary"], args, os.path.splitext(os.path.abspath(args.out))[0])
    results["plots"] = [os.path.basename(png)] if png else []
    results["wall_s_this_invocation"] = time.perf_counter() - start
    save()
    print_table(results["summary"], args)


if __name__ == "__main__":
    main()
