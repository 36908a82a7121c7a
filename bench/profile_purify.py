"""Where ``purify_``'s time goes beyond the fused op: torch.profiler over ``purify_`` per ranking at a
model shape (random weights, a drifted copy as the pre-trained state and random Hessians, all on the
device), next to the op alone. Writes the profiler's tables (self CPU time and device time per
operator) and the wall times as JSON.

    python bench/profile_purify.py --device cuda --model opt-1.3b --out bench/results/profile_purify_cuda.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pipeline import MODELS, build_model, sync, timed  # noqa: E402
from common import git_commit, write_json_atomically  # noqa: E402

from finepurify_ext import ops  # noqa: E402
from finepurify_ext.purify import RANKINGS, PurifyConfig, matched_parameters, purify_, scoring_for, word_embedding_name  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="opt-1.3b", choices=list(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=list(RANKINGS))
    parser.add_argument("--rows", type=int, default=25, help="operators kept per table")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args.model, dtype, device)
    params = dict(model.named_parameters())
    gen = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        pre = {n: p - (torch.randn(p.shape, generator=gen, device=device) * 1e-3).to(p.dtype) for n, p in params.items()}
        hessians = {n: torch.rand(p.shape, generator=gen, device=device) for n, p in params.items()}
        embedding = word_embedding_name(model)
        hessians[embedding][-1000:] = 0  # rows the clean data never reaches
    backup = {n: p.detach().clone() for n, p in params.items()}
    scored, _ = matched_parameters(model, pre)
    ranked = [n for n in scored if n != embedding]

    def restore():
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(backup[n])

    rows = []
    for ranking in args.rankings:
        config = PurifyConfig(ranking=ranking)
        scoring = scoring_for(config, ranked, [hessians[n] for n in ranked])

        def op():
            return ops.reset_most_abnormal_([params[n].data for n in ranked], [pre[n] for n in ranked], scoring.hessians,
                                            config.reserve_ratio, scoring.eps, ranking=scoring.ranking,
                                            count_moved_only=True).sum().item()

        restore(); op(); restore()
        op_s = timed(device, op)[0]
        restore(); purify_(model, pre, hessians, config); restore()
        purify_s = timed(device, lambda: purify_(model, pre, hessians, config))[0]
        restore()
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            purify_(model, pre, hessians, config)
            sync(device)
        averages = prof.key_averages()
        tables = {"self_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=args.rows)}
        if device.type == "cuda":
            tables["device"] = averages.table(sort_by="self_cuda_time_total", row_limit=args.rows)
        print(f"{ranking}: op {op_s * 1e3:.1f} ms, purify_ {purify_s * 1e3:.1f} ms\n{tables['self_cpu']}", flush=True)
        rows.append({"ranking": ranking, "op_s": op_s, "purify_s": purify_s, "ratio": round(purify_s / op_s, 2),
                     "tables": tables})
    report = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": args.model, "dtype": args.dtype, "rows": rows}
    write_json_atomically(args.out, report)


if __name__ == "__main__":
    main()
