"""The exact threshold search two ways, on one device, at growing model sizes: the three histogram
passes (threshold.threshold_from_histograms over purify.Feed) against a sample's bracket and the
score_candidates passes over it (purify._candidate_pass, threshold.search_ranges). Both give the
same threshold (checked); the median times tell where the sample starts to pay, which is where
purify.CANDIDATES_MIN_WEIGHTS sits.

    python bench/bench_search.py --device cpu --out bench/results/threshold_search_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HERE, git_commit, median_ms, search_from_sample, write_json_atomically  # noqa: E402

from finepurify_ext import ops  # noqa: E402
from finepurify_ext import purify as purify_module  # noqa: E402
from finepurify_ext.threshold import threshold_from_histograms  # noqa: E402


def weights(total: int, tensors: int, device):
    """bfloat16 weights in equal tensors, drifted 0.01 (about a fifth stay unmoved in bfloat16),
    float32 Hessians uniform in [0, 1); drawn on the device."""
    gen = torch.Generator(device=device).manual_seed(total)
    size = total // tensors
    pre = [torch.randn(size, generator=gen, device=device).bfloat16() for _ in range(tensors)]
    ft = [(p.float() + 0.01 * torch.randn(size, generator=gen, device=device)).bfloat16() for p in pre]
    hessians = [torch.rand(size, generator=gen, device=device) for _ in range(tensors)]
    return ft, pre, hessians


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 25])
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "threshold_search_cpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    config = purify_module.PurifyConfig()  # the default: Hessian floor, moved weights counted, rho 0.3
    rows = []
    for total in args.sizes:
        ft, pre, hessians = weights(total, args.tensors, device)
        scoring = purify_module.scoring_for(config, [f"t{i}" for i in range(len(ft))], hessians)
        feed = purify_module.Feed(ft, pre, scoring)
        n = sum(f.numel() for f in ft)
        moved = n - int(feed.histogram(0, 0)[-1])
        k = ops.num_reset_for(moved, config.reserve_ratio)

        def sampled():
            return search_from_sample(feed, scoring, config, n, k)

        def histograms():
            return threshold_from_histograms(feed.histogram, k, n)

        threshold, candidates_passes = sampled()
        if threshold != histograms():
            raise RuntimeError(f"the two searches disagree at {n} weights")
        row = {"weights": n, "tensors": len(ft), "histogram_passes_ms": median_ms(histograms, device, args.repeats),
               "sample_and_candidates_ms": median_ms(sampled, device, args.repeats),
               "candidates_passes": candidates_passes}
        row["speedup"] = round(row["histogram_passes_ms"] / row["sample_and_candidates_ms"], 2)
        rows.append(row)
        print(f"{n:>11,} weights: histograms {row['histogram_passes_ms']:7.2f} ms, sample + {candidates_passes} "
              f"pass(es) {row['sample_and_candidates_ms']:7.2f} ms ({row['speedup']}x)")
    results = {"command": "python bench/bench_search.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": str(device),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "candidates_min_weights": purify_module.CANDIDATES_MIN_WEIGHTS, "rows": rows}
    write_json_atomically(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
