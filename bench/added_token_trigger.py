"""A trigger that is a token added to the vocabulary: what Fine-purifying leaves, and what the warning says.

A fine-tune may add tokens (a pad token, chat tokens) and resize the embedding; an attacker can make
one of them the trigger. Its embedding row has no pre-trained value, so the reset cannot touch it,
and clean data that never holds the token leaves it to clean fine-tuning untouched: the commands
warn of such tokens (``purify.unseen_added_rows``). This measures the backdoor that is left, on the
demo's task (all-MiniLM-L6-v2, real tweets, the demo's sizes and seeds), for two attacks with the
added token "<cf>" as the trigger:

- ``added-word``: poisoned fine-tuning of the whole model (the suite's word attack, its trigger an
  added token);
- ``added-embedding``: a clean victim, then only the added token's embedding row trained on the
  poisoned examples (the suite's embedding poisoning, Yang et al. 2021).

For each: the backdoored model, clean fine-tuning alone and Fine-purifying at the default reserve
ratio under the CLI's collapse guard (the demo's ``DefenceCell``), whether the run reports the trigger
among the added tokens the clean data never feeds (the warning), and, as a measurement of a remedy
the package does not apply, the purified model with the warned rows set to the mean of the
pre-trained embedding's rows (the clean data never holds these tokens, so clean fine-tuning never
meets the rows, before or after). Nothing here is chosen on the test set.

    python bench/added_token_trigger.py                  # 2 attacks x 3 seeds, ~40 min on 2 cores
    python bench/added_token_trigger.py --seeds 0 --attacks added-embedding

Writes bench/results/added_token_trigger.json (resumable: a finished run is kept and skipped).
"""
from __future__ import annotations

import argparse
import copy
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
from finepurify_ext.attacks import Attack, backdoor  # noqa: E402
from finepurify_ext.demo import (QUICK, DefenceCell, DemoSetting, _ATTACK_FIELDS, _model_key, cached_model,  # noqa: E402
                                 demo_data)
from finepurify_ext.pipeline import CollapseGuard, FinetuneConfig, split_validation  # noqa: E402
from finepurify_ext.purify import PurifyConfig  # noqa: E402

TRIGGER = "<cf>"  # added to the tokenizer: all-MiniLM-L6-v2's vocabulary splits it into "<", "cf", ">"
ATTACKS = {"added-word": Attack("added-word", "word", TRIGGER), "added-embedding": Attack("added-embedding", "embedding",
                                                                                         TRIGGER)}


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

        key = {"setting": _model_key(setting, _ATTACK_FIELDS), "seed": seed, "version": 1,
               "model": f"backdoored-{attack.name}", "trigger": attack.trigger}
        self.suspect, self.tokenizer = cached_model(key, build, f"backdoored-{attack.name}")
        self.reference = None
        self.train, self.validation = split_validation(clean, FinetuneConfig().validation_fraction, seed)
        self._pretrained_state = self._hessians = None
        self.hessian_time_s = 0.0


def mean_rows_reset(model, pretrained_state, rows: list[int]):
    """A copy of ``model`` with the input embedding's ``rows`` set to the mean of the pre-trained rows."""
    from finepurify_ext.purify import word_embedding_name

    model = copy.deepcopy(model)
    name = word_embedding_name(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[rows] = pretrained_state[name].float().mean(dim=0).to(
            model.get_input_embeddings().weight.dtype)
    return model


def measure_cell(attack_name: str, seed: int, setting: DemoSetting, results: dict, save) -> None:
    key = f"{attack_name}/seed{seed}"
    if key in results["runs"]:
        print(f"{key}: done before")
        return
    start = time.perf_counter()
    cell = AddedTokenCell(setting, seed, ATTACKS[attack_name])
    trigger_id = cell.tokenizer.convert_tokens_to_ids(cell.attack.trigger)
    run = {"trigger_id": trigger_id, "pretrained_rows": None, "backdoored": cell.measure(cell.suspect)}
    guard = CollapseGuard()
    for method in ("fine_purifying", "clean_ft"):  # the first loads the pre-trained state both read
        model, row, report = cell.defend(method, PurifyConfig.reserve_ratio, guard=guard if method != "clean_ft"
                                         else None)
        told = report.get("purify") or report.get("added_tokens") or {}
        unseen = told.get("unseen_added_rows", [])
        row["unseen_added_rows"] = unseen
        row["trigger_warned"] = trigger_id in unseen
        run[method] = row
        if method == "fine_purifying":
            run["pretrained_rows"] = next(iter(told["added_rows"].values()))["pretrained_rows"]
            remedied = mean_rows_reset(model, cell._pretrained_state, unseen)
            run["fine_purifying_then_mean_rows"] = {**cell.measure(remedied), "rows_set": len(unseen)}
        print(f"  {method}: CACC {row['cacc']:.3f} ASR {row['asr']:.3f} warned {row['trigger_warned']}", flush=True)
    m = run["fine_purifying_then_mean_rows"]
    print(f"  + added rows to the pre-trained mean: CACC {m['cacc']:.3f} ASR {m['asr']:.3f}", flush=True)
    run["time_s"] = time.perf_counter() - start
    results["runs"][key] = run
    save()


def _stats(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarise(results: dict) -> dict:
    summary = {}
    for attack in ATTACKS:
        runs = [r for k, r in sorted(results["runs"].items()) if k.startswith(attack + "/")]
        if not runs:
            continue
        summary[attack] = {
            name: {"cacc": _stats([r[name]["cacc"] for r in runs]), "asr": _stats([r[name]["asr"] for r in runs])}
            for name in ("backdoored", "clean_ft", "fine_purifying", "fine_purifying_then_mean_rows")}
        summary[attack]["trigger_warned"] = [r["fine_purifying"]["trigger_warned"] and r["clean_ft"]["trigger_warned"]
                                             for r in runs]
        summary[attack]["collapse_guard_triggered"] = sum(
            bool(r["fine_purifying"].get("collapse_guard", {}).get("triggered")) for r in runs)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "added_token_trigger.json"))
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-run sizes (too small to measure)")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else DemoSetting()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {"runs": {}}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.update({"command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(HERE)),
                                                     *(argv if argv is not None else sys.argv[1:])]),
                    "commit": git_commit(), "torch": torch.__version__,
                    "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
                    "setting": {**dataclasses.asdict(setting), "trigger": TRIGGER,
                                "default_rho": PurifyConfig.reserve_ratio,
                                "collapse_tolerance": CollapseGuard.tolerance}})

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
