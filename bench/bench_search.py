"""The exact threshold search two ways, on one device, at growing model sizes: the three histogram
passes (threshold.threshold_from_histograms over purify.Feed) against a sample's bracket and the
score_candidates passes over it (purify._candidate_pass, threshold.search_ranges). Both give the
same threshold (checked); the median times tell where the sample starts to pay, which is where
threshold.CANDIDATES_MIN_WEIGHTS sits.

    python bench/bench_search.py --device cpu --out bench/results/threshold_search_cpu.json

With ``--ranks N`` the same weights are split over N gloo processes (a thread each) and the two
searches are those of ``ops.score_threshold(group=...)`` (threshold.distributed_score_threshold):
each pass's counts summed with an ``all_reduce``, the sample and the kept keys gathered.

    python bench/bench_search.py --ranks 2 --out bench/results/threshold_search_distributed_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (HERE, cpu_name, git_commit, median_ms, peak_extra, search_from_sample,  # noqa: E402
                    write_json_atomically)

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


def distributed_rows(rank: int, world: int, rendezvous: str, sizes, tensors: int, repeats: int, out: str):
    """One gloo rank of ``--ranks``: its share of each size's weights, scored as one process scores
    them all (one Hessian floor; moved weights counted), both searches timed (the collectives keep
    the ranks in step; rank 0's clock counts) and checked equal."""
    import torch.distributed as dist

    from finepurify_ext.threshold import distributed_score_threshold

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    device, config, rows = torch.device("cpu"), purify_module.PurifyConfig(), []
    for total in sizes:
        ft, pre, hessians = weights(total, tensors, device)  # every rank draws them all, and scores them as
        scoring = purify_module.scoring_for(config, [f"t{i}" for i in range(len(ft))], hessians)  # one process
        n = sum(f.numel() for f in ft)
        moved = n - int(purify_module.Feed(ft, pre, scoring).histogram(0, 0)[-1])
        k = ops.num_reset_for(moved, config.reserve_ratio)
        mine = range(rank * tensors // world, (rank + 1) * tensors // world)  # each rank its own tensors
        ft, pre, hessians = [ft[i] for i in mine], [pre[i] for i in mine], [scoring.hessians[i] for i in mine]
        ranking = scoring.ranking.subset(list(mine))

        def search(how):
            return distributed_score_threshold(ft, pre, hessians, k, scoring.eps, ranking=ranking, search=how)

        if search("sample") != search("histograms"):
            raise RuntimeError(f"the two searches disagree at {n} weights over {world} ranks")
        row = {"weights": n, "tensors": tensors, "ranks": world}
        times = {"histograms": [], "sample": []}
        for _ in range(repeats + 2):  # alternated, so both see the same load (two ranks share this machine's cores)
            for how, kept in times.items():
                dist.barrier()
                start = time.perf_counter()
                search(how)
                kept.append(time.perf_counter() - start)
        for how, kept in times.items():
            row[f"{how}_ms"] = round(statistics.median(kept[2:]) * 1e3, 3)
        row["speedup"] = round(row["histograms_ms"] / row["sample_ms"], 2)
        rows.append(row)
        if rank == 0:
            print(f"{n:>11,} weights over {world} ranks: histograms {row['histograms_ms']:7.2f} ms, "
                  f"sample {row['sample_ms']:7.2f} ms ({row['speedup']}x)", flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 25])
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ranks", type=int, default=0,
                        help="split the weights over this many gloo processes on the CPU (torch.distributed)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "threshold_search_cpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and len(args.sizes) > 1 and not args.ranks:
        # Each size in a process of its own, with blocks of 128 KB and more mapped and unmapped by
        # glibc rather than kept on its heap once freed: a call's peak resident set is then its own
        # (after a smaller size in the same process, the sample's showed 1.0 MiB against 7.9 alone).
        import subprocess
        import tempfile

        rows = []
        with tempfile.TemporaryDirectory() as scratch:
            for total in args.sizes:
                out = os.path.join(scratch, f"{total}.json")
                subprocess.run([sys.executable, __file__, "--device", args.device, "--sizes", str(total), "--tensors",
                                str(args.tensors), "--repeats", str(args.repeats), "--out", out], check=True,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
                with open(out) as f:
                    rows += json.load(f)["rows"]
        write_results(args, str(device), torch.get_num_threads(), rows)
        return
    if args.ranks:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as scratch:
            rows_file = os.path.join(scratch, "rows.json")
            mp.start_processes(distributed_rows, args=(args.ranks, os.path.join(scratch, "rendezvous"), args.sizes,
                                                       args.tensors, args.repeats, rows_file),
                               nprocs=args.ranks, start_method="spawn")
            with open(rows_file) as f:
                rows = json.load(f)
        write_results(args, "cpu (gloo)", 1, rows)
        return

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

        def sampled_million():  # the sample purify_ took before 810c630: at most a million weights
            budget = purify_module.sample_budget
            purify_module.sample_budget = lambda t: max(1 << 14, min(1 << 20, t // 64))
            try:
                return sampled()
            finally:
                purify_module.sample_budget = budget

        threshold, candidates_passes = sampled()
        if threshold != histograms():
            raise RuntimeError(f"the two searches disagree at {n} weights")
        extra = {how: peak_extra(device, fn)[1] for how, fn in (("histograms", histograms), ("sample", sampled))}
        row = {"weights": n, "tensors": len(ft), "histogram_passes_ms": median_ms(histograms, device, args.repeats),
               "sample_and_candidates_ms": median_ms(sampled, device, args.repeats),
               "candidates_passes": candidates_passes,
               "million_sample_ms": median_ms(sampled_million, device, args.repeats),
               "million_sample_passes": sampled_million()[1],
               # peak memory beyond the inputs (CPU: resident set; CUDA: the allocator's), one call each
               **{f"{how}_extra_mib": None if b is None else round(b / 2**20, 1) for how, b in extra.items()}}
        row["speedup"] = round(row["histogram_passes_ms"] / row["sample_and_candidates_ms"], 2)
        rows.append(row)
        print(f"{n:>11,} weights: histograms {row['histogram_passes_ms']:7.2f} ms, sample + {candidates_passes} "
              f"pass(es) {row['sample_and_candidates_ms']:7.2f} ms ({row['speedup']}x; a million's sample + "
              f"{row['million_sample_passes']}: {row['million_sample_ms']:7.2f} ms); extra memory "
              f"{row['histograms_extra_mib']} / {row['sample_extra_mib']} MiB")
    write_results(args, str(device), torch.get_num_threads(), rows)


def write_results(args, device: str, threads: int, rows) -> None:
    results = {"command": "python bench/bench_search.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}", "device": device,
               "torch": torch.__version__, "threads": threads,
               "candidates_min_weights": purify_module.CANDIDATES_MIN_WEIGHTS, "rows": rows}
    write_json_atomically(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
