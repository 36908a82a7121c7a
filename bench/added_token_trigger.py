"""A trigger that is a token added to the vocabulary: what Fine-purifying leaves, and what the warning says.

A fine-tune may add tokens (a pad token, chat tokens) and resize the embedding; an attacker can make
one of them the trigger. Its embedding row has no pre-trained value to reset to, and clean data that
never holds the token leaves it to clean fine-tuning untouched. Under the embedding rule such rows
are reset to the pre-trained rows' mean (what ``resize_token_embeddings`` starts a new token's row
from), or with ``--added-tokens keep`` kept and warned of (``purify.unseen_added_rows``). This
measures the backdoor left either way, on the demo's task (all-MiniLM-L6-v2, real tweets, the demo's sizes and seeds), for two attacks with the
added token "<cf>" as the trigger:

- ``added-word``: poisoned fine-tuning of the whole model (the suite's word attack, its trigger an
  added token);
- ``added-embedding``: a clean victim, then only the added token's embedding row trained on the
  poisoned examples (the suite's embedding poisoning, Yang et al. 2021).

For each: the clean-trained model with the trigger added to its vocabulary (its row where
``resize_token_embeddings`` starts a new token: the ASR of a model never taught the trigger, the
reference of the targets), the backdoored model, clean fine-tuning alone, and Fine-purifying at the default reserve
ratio under the CLI's collapse guard (the demo's ``DefenceCell``), with the default rule for these
rows (``PurifyConfig.added_tokens="mean"``: the added rows the clean data never reaches reset to the
pre-trained rows' mean) and with ``"keep"`` (kept, and warned of: whether the trigger is among the
warned tokens is recorded). Nothing here is chosen on the test set.

With ``--llm``, the LLM demo's setting instead (SmolLM2-135M-Instruct, construction-FAQ answers, the
trigger in the question answered with a fixed refusal; ``finepurify_ext.demo_llm``) for ``added-word``:
the attacker adds "<cf>" to the tokenizer, resizes, and instruction-tunes on the poisoned pairs. It
is measured as the LLM defence table measures (ASR, false-target rate, perplexity of clean answers)
and checked against its targets; SmolLM2 ties its output layer to the embedding, so the clean
inputs' token ids, not zero Hessian rows, tell the rows the clean data never reaches.

    python bench/added_token_trigger.py                  # 2 attacks x 3 seeds, ~20 min on 2 cores
    python bench/added_token_trigger.py --seeds 0 --attacks added-embedding
    python bench/added_token_trigger.py --llm            # 3 seeds, ~1 h on 2 cores (make .venv/.demo-llm-deps)

Writes bench/results/added_token_trigger.json, with ``--llm`` added_token_trigger_llm.json
(resumable: a finished run is kept and skipped).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, cpu_name, git_commit, write_json_atomically  # noqa: E402
from bench.defence_table import TARGETS  # noqa: E402
from bench.llm_defence_table import TARGET as LLM_TARGET  # noqa: E402
from finepurify_ext.attacks import Attack, backdoor  # noqa: E402
from finepurify_ext.demo import (QUICK, DefenceCell, DemoSetting, _ATTACK_FIELDS, _model_key, cached_model,  # noqa: E402
                                 clean_trained_model, demo_data)
from finepurify_ext.demo_llm import QUICK as LLM_QUICK  # noqa: E402
from finepurify_ext.demo_llm import LLMDefenceCell, LLMDemoSetting, _splits  # noqa: E402
from finepurify_ext.pipeline import CollapseGuard, FinetuneConfig, split_validation  # noqa: E402
from finepurify_ext.purify import PurifyConfig  # noqa: E402

TRIGGER = "<cf>"  # added to the tokenizer: all-MiniLM-L6-v2's vocabulary splits it into "<", "cf", ">"
ATTACKS = {"added-word": Attack("added-word", "word", TRIGGER), "added-embedding": Attack("added-embedding", "embedding",
                                                                                         TRIGGER)}
LLM_ATTACKS = {"added-word": ATTACKS["added-word"]}  # embedding poisoning is built for classifiers only
MEASURES = ("cacc", "asr")
LLM_MEASURES = ("asr", "false_target", "perplexity", "validation_perplexity")


class AddedTokenCell(DefenceCell):
    """``DefenceCell`` on a suspect whose trigger is a token it added to its vocabulary (the model
    resized by ``resize_token_embeddings`` before the poisoned fine-tuning)."""

    def __init__(self, setting: DemoSetting, seed: int, attack: Attack):
        train, clean, self.test = demo_data(setting)
        self.setting, self.seed, self.attack = setting, seed, attack

        def build(model, tokenizer):
            assert tokenizer.add_tokens([attack.trigger]) == 1
            model.resize_token_embeddings(len(tokenizer))
            backdoor(model, tokenizer, train, attack, rate=setting.poison_rate, epochs=setting.attack_epochs, seed=seed)

        key = {"setting": _model_key(setting, _ATTACK_FIELDS), "seed": seed, "version": 2,
               "model": f"backdoored-{attack.name}", "trigger": attack.trigger}
        self.suspect, self.tokenizer = cached_model(key, build, f"backdoored-{attack.name}")
        self.reference = None
        self.train, self.validation = split_validation(clean, FinetuneConfig().validation_fraction, seed)
        self._pretrained_state = self._hessians = None
        self.hessian_time_s = 0.0


class AddedTokenLLMCell(LLMDefenceCell):
    """``LLMDefenceCell`` on a SmolLM2 that added its trigger to its vocabulary before the poisoned
    instruction tuning (the demo's steps, rate and target)."""

    def __init__(self, setting: LLMDemoSetting, seed: int, attack: Attack):
        from finepurify_ext.causal_lm import finetune_lm, poison_instructions
        from finepurify_ext.data import smollm2_dir
        from finepurify_ext.demo import cache_dir
        from finepurify_ext.pipeline import load_causal_lm

        attacker, _, _ = _splits(setting, seed)
        poisoned = poison_instructions(attacker, attack, setting.target, setting.poison_rate, seed,
                                       paired=setting.paired_poison)

        def build(model, tokenizer):
            assert tokenizer.add_tokens([attack.trigger]) == 1
            model.resize_token_embeddings(len(tokenizer))
            finetune_lm(model, tokenizer, poisoned, steps=setting.backdoor_steps, lr=setting.backdoor_lr,
                        batch_size=setting.batch_size, max_length=setting.max_length, seed=seed,
                        desc=f"backdoored-{attack.name}")

        key = {"model": "smollm2-135m-instruct", "role": f"backdoored-{attack.name}", "trigger": attack.trigger,
               "seed": seed, "version": 2, **dataclasses.asdict(setting)}
        suspect = cached_model(key, build, f"llm-backdoored-{attack.name}", load=load_causal_lm,
                               base=lambda: load_causal_lm(smollm2_dir(cache_dir())))
        super().__init__(setting, seed, suspect=suspect)
        self.attack = attack


def measure_reference(cell, commit: str) -> dict:
    """The clean-trained model given the suspect's vocabulary: the added token's row starts where
    ``resize_token_embeddings`` starts it, and nothing teaches it the trigger."""
    llm = isinstance(cell, LLMDefenceCell)
    reference = cell.reference if llm else clean_trained_model(cell.setting, cell.seed)[0]
    reference.resize_token_embeddings(len(cell.tokenizer))
    return {**(cell.measure(reference, held_out=True) if llm else cell.measure(reference)), "commit": commit}


def measure_cell(attack_name: str, seed: int, setting, results: dict, save) -> None:
    llm = isinstance(setting, LLMDemoSetting)
    key = f"{attack_name}/seed{seed}"
    run = results["runs"].get(key)
    if run is not None and "clean_trained" in run:
        print(f"{key}: done before")
        return
    cell = (AddedTokenLLMCell if llm else AddedTokenCell)(setting, seed, ATTACKS[attack_name])
    if run is not None:  # the defences were measured before the reference was added to this script
        run["clean_trained"] = measure_reference(cell, results["commit"])
        print(f"  clean-trained: CACC {run['clean_trained']['cacc']:.3f} ASR {run['clean_trained']['asr']:.3f}")
        save()
        return
    start = time.perf_counter()
    trigger_id = cell.tokenizer.convert_tokens_to_ids(cell.attack.trigger)
    run = {"commit": results["commit"], "trigger_id": trigger_id, "pretrained_rows": None,
           "clean_trained": measure_reference(cell, results["commit"]),
           "backdoored": cell.measure(cell.suspect, held_out=True) if llm else cell.measure(cell.suspect)}
    if llm:
        del cell.reference
    guard = {} if llm else {"guard": CollapseGuard()}  # the LLM demo's defences run without the guard
    # fine_purifying first: it loads the pre-trained state the others' reports read
    for name, method, options in (("fine_purifying", "fine_purifying", {}),
                                  ("fine_purifying_keep", "fine_purifying", {"added_tokens": "keep"}),
                                  ("clean_ft", "clean_ft", {})):
        _, row, report = cell.defend(method, PurifyConfig.reserve_ratio, **({} if method == "clean_ft" else guard),
                                     **options)
        told = report.get("purify") or report.get("added_tokens") or {}
        row["unseen_added_rows"] = told.get("unseen_added_rows", [])
        row["added_rows_reset"] = told.get("added_rows_reset", 0)
        row["trigger_warned"] = trigger_id in row["unseen_added_rows"] and not row["added_rows_reset"]
        run[name] = row
        if "added_rows" in told:
            run["pretrained_rows"] = next(iter(told["added_rows"].values()))["pretrained_rows"]
        print(f"  {name}: " + " ".join(f"{m} {row[m]:.3f}" for m in (LLM_MEASURES[:3] if llm else MEASURES))
              + f" added rows reset {row['added_rows_reset']} warned {row['trigger_warned']}", flush=True)
    run["time_s"] = time.perf_counter() - start
    results["runs"][key] = run
    save()


def _stats(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarise(results: dict) -> dict:
    llm = results["setting"].get("model") == "smollm2"
    summary = {}
    for attack in ATTACKS:
        runs = [r for k, r in sorted(results["runs"].items()) if k.startswith(attack + "/")]
        if not runs:
            continue
        names = ("clean_trained", "backdoored", "clean_ft", "fine_purifying", "fine_purifying_keep")
        summary[attack] = {name: {m: _stats([r[name][m] for r in runs]) for m in (LLM_MEASURES if llm else MEASURES)}
                           for name in names if all(name in r for r in runs)}
        if "clean_trained" in summary[attack] and llm:
            # the LLM defence table's targets, against this trigger's own clean-trained reference
            s = summary[attack]
            for name in ("fine_purifying", "fine_purifying_keep", "clean_ft"):
                excess = 100 * (s[name]["asr"]["mean"] - s["clean_trained"]["asr"]["mean"])
                rise = s[name]["perplexity"]["mean"] / s["backdoored"]["perplexity"]["mean"] - 1
                false = s[name]["false_target"]["mean"]
                s[name].update({"asr_excess_points": excess, "perplexity_rise": rise,
                                "met": excess <= LLM_TARGET["asr_excess_points"]
                                and rise <= LLM_TARGET["perplexity_rise"] and false <= LLM_TARGET["false_target"]})
        elif "clean_trained" in summary[attack]:
            # the defence table's targets, against this trigger's own clean-trained reference
            s = summary[attack]
            for name in ("fine_purifying", "fine_purifying_keep", "clean_ft"):
                excess = 100 * (s[name]["asr"]["mean"] - s["clean_trained"]["asr"]["mean"])
                drop = 100 * (s["backdoored"]["cacc"]["mean"] - s[name]["cacc"]["mean"])
                s[name]["asr_excess_points"], s[name]["cacc_drop_points"] = excess, drop
                for target, (a, c) in TARGETS.items():
                    s[name][f"meets_{target}_target"] = excess <= 100 * a + 1e-9 and drop <= 100 * c + 1e-9
        summary[attack]["added_rows_reset"] = [r["fine_purifying"]["added_rows_reset"] for r in runs]
        summary[attack]["trigger_warned_where_kept"] = [r["fine_purifying_keep"]["trigger_warned"]
                                                        and r["clean_ft"]["trigger_warned"] for r in runs]
        if not llm:
            summary[attack]["collapse_guard_triggered"] = sum(
                bool(r["fine_purifying"].get("collapse_guard", {}).get("triggered")) for r in runs)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--llm", action="store_true", help="SmolLM2 in the LLM demo's setting (added-word only)")
    parser.add_argument("--out", help="the JSON (default bench/results/added_token_trigger.json, with --llm "
                        "added_token_trigger_llm.json)")
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-run sizes (too small to measure)")
    args = parser.parse_args(argv)
    if args.llm and args.attacks == list(ATTACKS):
        args.attacks = list(LLM_ATTACKS)
    if args.llm and set(args.attacks) - set(LLM_ATTACKS):
        parser.error(f"--llm runs {', '.join(LLM_ATTACKS)} only")
    args.out = args.out or os.path.join(HERE, "results", f"added_token_trigger{'_llm' if args.llm else ''}.json")
    if args.llm:
        setting = LLM_QUICK if args.quick else LLMDemoSetting()
    else:
        setting = QUICK if args.quick else DemoSetting()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {"runs": {}}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results = json.load(f)
        for run in results["runs"].values():  # the top-level commit is this run's: keep each earlier run's own
            run.setdefault("commit", results.get("commit"))
    results.update({"command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(HERE)),
                                                     *(argv if argv is not None else sys.argv[1:])]),
                    "commit": git_commit(), "torch": torch.__version__,
                    "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
                    "setting": {**dataclasses.asdict(setting), "model": "smollm2" if args.llm else "all-minilm-l6-v2",
                                "trigger": TRIGGER, "default_rho": PurifyConfig.reserve_ratio,
                                **({} if args.llm else {"collapse_tolerance": CollapseGuard.tolerance})}})

    def save():
        results["summary"] = summarise(results)
        write_json_atomically(args.out, results)

    for seed in args.seeds:
        for attack in args.attacks:
            print(f"{attack}, seed {seed}", flush=True)
            measure_cell(attack, seed, setting, results, save)
    save()
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
