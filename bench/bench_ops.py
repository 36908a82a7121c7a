"""Benchmark of the fused ops against the fastest pure-PyTorch pipeline, in one run.

Synthetic model: BERT-base shapes (about 110M parameters, 199 tensors of very different sizes),
weights in float32 or bfloat16, hessians in float32. For each case: median wall time of the ops and
of the pure-PyTorch baseline (finepurify_ext.reference.fast_*), their ratio, bytes moved and GB/s,
and the peak extra memory of each, measured in a fresh subprocess from the process's peak RSS.

    python bench/bench_ops.py                  # writes bench/results/cpu_ops.json
    python bench/bench_ops.py --repeats 3 --layers 2   # quicker, smaller
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

from common import cpu_name, git_commit, search_from_sample, status_kib, write_json_atomically

import finepurify_ext
from finepurify_ext import ops
from finepurify_ext import reference as ref

EPS = 1e-8
RESERVE_RATIO = 0.7
HERE = os.path.dirname(os.path.abspath(__file__))


def bert_base_shapes(layers=12, hidden=768, ffn=3072, vocab=30522, positions=512):
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def make_model(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pre, ft, hess = [], [], []
    for shape in shapes:
        p = torch.randn(shape, generator=gen) * 0.02
        f = p + torch.randn(shape, generator=gen) * 1e-3
        h = torch.rand(shape, generator=gen) * 1e-4
        pre.append(p.to(dtype))
        ft.append(f.to(dtype))
        hess.append(h)
    return ft, pre, hess


def timed(fn, repeats, setup=None):
    times = []
    for i in range(repeats + 1):  # the first run warms up
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i > 0:
            times.append(elapsed)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


# ------------------------------------------------------------------------------ the cases


def threshold_passes(ft, pre, hess, k) -> int:
    """The passes over (ft, pre, h) the ops' threshold search takes here: from 1M weights on the
    CPU a sample's bracket and its score_candidates passes, counted by running purify_'s search (the
    same sample, constants and narrowing) once; else three histogram passes."""
    from finepurify_ext import purify as purify_module

    n = sum(t.numel() for t in ft)
    if n < purify_module.CANDIDATES_MIN_WEIGHTS or ft[0].device.type != "cpu":
        return 3
    scoring = purify_module.Scoring(hess, EPS, ops.PLAIN)
    config = purify_module.PurifyConfig(reserve_ratio=1.0 - k / n, count_moved_only=False)
    return search_from_sample(purify_module.Feed(ft, pre, scoring), scoring, config, n, k)[1]


def case_fns(case, shapes, dtype):
    """Returns (ours, baseline, setup, bytes_moved) callables for one case (bytes_moved counts the
    threshold search's passes by running one: never in a memory probe, whose peak it would hide)."""
    ft, pre, hess = make_model(shapes, dtype)
    wbytes = torch.tensor([], dtype=dtype).element_size()
    n = sum(t.numel() for t in ft)
    if case == "detect_and_reset":
        saved = [t.clone() for t in ft]

        def restore():
            torch._foreach_copy_(ft, saved)

        def ours():
            ops.reset_most_abnormal_(ft, pre, hess, RESERVE_RATIO, EPS)

        def baseline():
            ref.fast_reset_most_abnormal_(ft, pre, hess, RESERVE_RATIO, EPS)

        # the threshold's passes + 1 reset pass reading (ft, pre, h); resets write 30% of ft.
        def moved():
            passes = threshold_passes(ft, pre, hess, ops.num_reset_for(n, RESERVE_RATIO))
            return (passes + 1) * n * (2 * wbytes + 4) + (1 - RESERVE_RATIO) * n * wbytes
        return ours, baseline, restore, moved
    if case == "score_threshold":
        k = ops.num_reset_for(n, RESERVE_RATIO)

        def ours():
            ops.score_threshold(ft, pre, hess, k, EPS)

        def baseline():
            ref.fast_score_threshold(ft, pre, hess, k, EPS)[0].item()

        return ours, baseline, None, lambda: threshold_passes(ft, pre, hess, k) * n * (2 * wbytes + 4)
    if case == "accumulate_sq_grads":
        grads = [t.to(dtype) for t in ft]
        hessians = hess

        def ours():
            ops.accumulate_sq_grads_(hessians, grads, 1.0)

        def baseline():
            ref.fast_accumulate_sq_grads_(hessians, grads, 1.0)

        return ours, baseline, None, lambda: n * (wbytes + 8)
    raise ValueError(case)


def peak_extra_memory(case, impl, layers, dtype_name):
    """Runs one call in a fresh process; returns its peak RSS above the RSS before the call."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", case, impl, dtype_name, "--layers", str(layers)],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def memory_probe(case, impl, dtype_name, layers):
    ours, baseline, setup, _ = case_fns(case, bert_base_shapes(layers), getattr(torch, dtype_name))
    fn = ours if impl == "ours" else baseline
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    fn()
    print((status_kib("VmHWM") - before) * 1024)


def copy_bandwidth_gbs(nbytes=1 << 30, repeats=5):
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / t["min_s"] / 1e9  # read + write


TARGETS = {
    # (case, dtype): minimum speed-up over pure PyTorch, and memory bound in bytes (or None)
    ("detect_and_reset", "float32"): (2.0, 64 * 2**20),
    ("detect_and_reset", "bfloat16"): (2.0, 64 * 2**20),
    ("accumulate_sq_grads", "float32"): (1.0, None),
    ("accumulate_sq_grads", "bfloat16"): (1.5, None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu_ops.json"))
    parser.add_argument("--memory-probe", nargs=3, metavar=("CASE", "IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe, layers=args.layers)
        return

    shapes = bert_base_shapes(args.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"model: BERT-base shapes, {len(shapes)} tensors, {n / 1e6:.1f}M parameters; "
          f"{torch.get_num_threads()} threads; {cpu_name()}")
    bandwidth = copy_bandwidth_gbs()
    print(f"measured copy bandwidth: {bandwidth:.1f} GB/s (read + write)")
    results = []
    for case in ("detect_and_reset", "score_threshold", "accumulate_sq_grads"):
        for dtype_name in ("float32", "bfloat16"):
            ours, baseline, setup, moved_fn = case_fns(case, shapes, getattr(torch, dtype_name))
            moved = moved_fn()
            t_ours = timed(ours, args.repeats, setup)
            t_base = timed(baseline, args.repeats, setup)
            del ours, baseline, setup
            mem_ours = peak_extra_memory(case, "ours", args.layers, dtype_name)
            mem_base = peak_extra_memory(case, "baseline", args.layers, dtype_name)
            speedup = t_base["median_s"] / t_ours["median_s"]
            row = {
                "case": case, "weight_dtype": dtype_name, "parameters": n,
                "ours": t_ours, "pure_pytorch": t_base, "speedup": round(speedup, 2),
                "bytes_moved_ours": int(moved), "gbs_ours": round(moved / t_ours["median_s"] / 1e9, 2),
                "peak_extra_bytes_ours": mem_ours, "peak_extra_bytes_pure_pytorch": mem_base,
            }
            target = TARGETS.get((case, dtype_name))
            if target is not None:
                min_speedup, max_mem = target
                row["target"] = {"min_speedup": min_speedup, "max_extra_bytes": max_mem}
                row["target_met"] = bool(speedup >= min_speedup and (max_mem is None or mem_ours <= max_mem))
            results.append(row)
            print(f"{case:20s} {dtype_name:9s} ours {t_ours['median_s'] * 1e3:8.1f} ms  "
                  f"pure {t_base['median_s'] * 1e3:8.1f} ms  x{speedup:5.2f}  "
                  f"{row['gbs_ours']:6.1f} GB/s  extra mem ours {mem_ours / 2**20:7.1f} MiB "
                  f"pure {mem_base / 2**20:7.1f} MiB" + ("" if target is None else f"  target met: {row['target_met']}"))
    report = {
        "command": "python bench/bench_ops.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "finepurify_ext": finepurify_ext.__version__,
        "model": f"BERT-base shapes x{args.layers} layers: {len(shapes)} tensors, {n} parameters",
        "reserve_ratio": RESERVE_RATIO,
        "copy_bandwidth_gbs": round(bandwidth, 2),
        "baseline": "finepurify_ext.reference.fast_* (torch._foreach_*, flat scores + torch.kthvalue, torch.where)",
        "results": results,
    }
    write_json_atomically(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
