"""Where do the rankings differ? For one backdoored model of the defence table, the weights each
ranking resets under the same budget: overlaps (Jaccard), the share of the budget per layer, and for
Fine-purifying how many of its resets fall where the Hessian was floored (where it ranks like
|drift| scaled by a constant).

    python bench/diagnose_rankings.py [--attack word] [--seed 0] [--reserve-ratio 0.5]

Writes bench/results/diagnose_rankings_<attack>_seed<seed>.json. Needs the models cached by
bench/defence_table.py (or builds them).
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, write_json_atomically  # noqa: E402


def layer_of(name: str) -> str:
    m = re.search(r"layer\.(\d+)\.", name)
    if m:
        return f"layer {m.group(1)}"
    return "embeddings" if "embeddings" in name else name.split(".")[1] if "." in name else name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", default="word")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reserve-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    os.environ.setdefault("FINEPURIFY_CACHE", os.path.join(os.path.dirname(HERE), ".cache", "finepurify"))

    from finepurify_ext import data
    from finepurify_ext.demo import DemoSetting, demo_data, demo_models
    from finepurify_ext.pipeline import HessianConfig, clean_hessian, pretrained_state_for, split_validation
    from finepurify_ext.purify import PurifyConfig, _quantile, purify_, word_embedding_name

    setting = DemoSetting(attack=args.attack)
    _, clean, _ = demo_data(setting)
    suspect, _, tok = demo_models(setting, args.seed)
    train, _ = split_validation(clean, 0.25, args.seed)
    pretrained_state = pretrained_state_for(suspect, data.minilm_dir())
    hessians, _ = clean_hessian(suspect, tok, train, HessianConfig(), progress=False)
    embedding = word_embedding_name(suspect)
    ranked = [n for n in pretrained_state if n != embedding]
    floor = _quantile([hessians[n] for n in ranked], 0.5)

    masks = {}
    for ranking in ("fine_purifying", "no_hessian", "magnitude", "fine_mixing"):
        model = copy.deepcopy(suspect)
        purify_(model, pretrained_state, hessians, PurifyConfig(ranking=ranking, reserve_ratio=args.reserve_ratio,
                                                                seed=args.seed))
        params = dict(model.named_parameters())
        masks[ranking] = {n: (params[n].data != dict(suspect.named_parameters())[n].data) for n in ranked}

    def count(mask):
        return sum(int(m.sum()) for m in mask.values())

    def jaccard(a, b):
        inter = sum(int((masks[a][n] & masks[b][n]).sum()) for n in ranked)
        union = sum(int((masks[a][n] | masks[b][n]).sum()) for n in ranked)
        return inter / max(union, 1)

    names = list(masks)
    per_layer = {}
    for ranking, mask in masks.items():
        total = max(count(mask), 1)
        shares = {}
        for n in ranked:
            shares[layer_of(n)] = shares.get(layer_of(n), 0) + int(mask[n].sum()) / total
        per_layer[ranking] = shares
    fp = masks["fine_purifying"]
    floored = sum(int((fp[n] & (hessians[n] <= floor)).sum()) for n in ranked) / max(count(fp), 1)
    result = {
        "command": "python bench/diagnose_rankings.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(), "attack": args.attack, "seed": args.seed, "reserve_ratio": args.reserve_ratio,
        "ranked_elements": sum(m.numel() for m in fp.values()), "reset": {r: count(m) for r, m in masks.items()},
        "jaccard": {f"{a} vs {b}": jaccard(a, b) for i, a in enumerate(names) for b in names[i + 1:]},
        "hessian_floor": floor,
        "fine_purifying_resets_where_hessian_floored": floored,
        "budget_share_per_layer": per_layer,
    }
    out = os.path.join(HERE, "results", f"diagnose_rankings_{args.attack}_seed{args.seed}.json")
    write_json_atomically(out, result)
    for k in ("reset", "jaccard", "fine_purifying_resets_where_hessian_floored"):
        print(k, result[k])
    print("budget share per layer:")
    for r, shares in per_layer.items():
        print(f"  {r:15s} " + "  ".join(f"{k} {100 * v:4.1f}%" for k, v in shares.items()))


if __name__ == "__main__":
    main()
