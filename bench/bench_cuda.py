"""GPU benchmark of the fused ops against the fastest pure-PyTorch pipeline, in one run.

Synthetic decoder-only models with real shapes: 125M (OPT-125m), 1.3B (OPT-1.3b) and 7B (LLaMA-7B,
bfloat16 weights only), hessians float32, generated on the GPU. Timed with CUDA events after
warm-up (median of --repeats). For every pass of every op and for the whole detect-and-reset
pipeline: time, bytes moved, GB/s, the fraction of the device's copy bandwidth (measured in the same
run), peak extra GPU memory, and the ratio against the best of the pure-PyTorch baselines
(finepurify_ext.reference): for the threshold, a torch-only radix select over the float bits with
torch.bincount, chunked torch.topk and torch.kthvalue on one flat score vector; for the
accumulation, foreach and per-tensor addcmul_. Where a baseline fails (out of memory, a size limit)
the error is kept; a baseline slower than --baseline-budget-s is timed once.

    python bench/bench_cuda.py                          # writes bench/results/cuda_ops.json
    python bench/bench_cuda.py --sizes 125m --repeats 3
    python bench/bench_cuda.py --sizes 1.3b --unmoved 0.5 --out /tmp/unmoved.json  # half never moved
    python bench/bench_cuda.py --device cpu --sizes tiny --repeats 1 --out /tmp/x.json  # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from common import git_commit, search_from_sample, write_json_atomically

import finepurify_ext
from finepurify_ext import ops
from finepurify_ext import reference as ref

EPS = 1e-8
RESERVE_RATIO = 0.7
SORT_BASELINE_MAX = 1 << 28  # elements
HERE = os.path.dirname(os.path.abspath(__file__))
OPS = torch.ops.finepurify


# --------------------------------------------------------------------------------- models


def decoder_shapes(vocab, hidden, layers, ffn, positions=0, gated=False, biases=True):
    """OPT-style (learned positions, biases, LayerNorm) or LLaMA-style (gated MLP, RMSNorm)."""
    shapes = [(vocab, hidden)] + ([(positions, hidden)] if positions else [])
    norm = [(hidden,), (hidden,)] if biases else [(hidden,)]
    for _ in range(layers):
        for _ in range(4):  # q, k, v, o
            shapes += [(hidden, hidden)] + ([(hidden,)] if biases else [])
        shapes += norm
        mlp_in = [(ffn, hidden)] * (2 if gated else 1)
        shapes += mlp_in + ([(ffn,)] if biases else []) + [(hidden, ffn)] + ([(hidden,)] if biases else [])
        shapes += norm
    shapes += norm
    if gated:
        shapes += [(vocab, hidden)]  # untied LM head
    return shapes


MODELS = {
    "tiny": dict(vocab=1000, hidden=64, layers=2, ffn=256, positions=128),
    "125m": dict(vocab=50272, hidden=768, layers=12, ffn=3072, positions=2050),
    "1.3b": dict(vocab=50272, hidden=2048, layers=24, ffn=8192, positions=2050),
    "7b": dict(vocab=32000, hidden=4096, layers=32, ffn=11008, gated=True, biases=False),
}
DTYPES = {"tiny": ("float32", "bfloat16"), "125m": ("float32", "bfloat16"),
          "1.3b": ("float32", "bfloat16"), "7b": ("bfloat16",)}


def make_model(shapes, dtype, device, seed=0, unmoved=0.0):
    """Weights ~ N(0, 0.02), drifts ~ N(0, 1e-3) (in bfloat16 3.6 % round away: weights that never
    moved), hessians ~ U(0, 1e-4); ``unmoved``: that fraction more keeps its pre-trained value, as
    a bfloat16 fine-tune's small updates or frozen parts leave it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ft, pre, hess = [], [], []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, device=device) * 0.02
        f = p + torch.randn(shape, generator=gen, device=device) * 1e-3
        if unmoved > 0:
            f = torch.where(torch.rand(shape, generator=gen, device=device) < unmoved, p, f)
        pre.append(p.to(dtype))
        ft.append(f.to(dtype))
        del p, f
        hess.append(torch.rand(shape, generator=gen, device=device) * 1e-4)
    return ft, pre, hess


# ----------------------------------------------------------------------------- measuring


class Device:
    def __init__(self, name):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, repeats, setup=None, warmup=2):
        """Median and min seconds of fn() (setup() runs untimed before each call)."""
        times = []
        for i in range(warmup + repeats):
            if setup is not None:
                setup()
            self.sync()
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                elapsed = start.elapsed_time(stop) / 1e3
            else:
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}

    def time_bounded(self, fn, repeats, setup=None, budget_s=2.0):
        """Like time(), for the pure-PyTorch baselines, whose slowest take seconds per call: one
        warm-up call, measured for time and peak memory, then as many repeats as fit budget_s
        (at least one). Keeps a GPU lease from being spent waiting on a baseline."""
        first = self.time(fn, 1, setup, warmup=0)["median_s"]
        mem = self.peak_extra_bytes(fn, setup) if first < budget_s else None
        n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
        if first >= budget_s:
            return {"median_s": first, "min_s": first, "repeats": 1, "note": "one call: over the time budget",
                    "peak_extra_bytes": mem}
        timing = self.time(fn, n, setup, warmup=0)
        timing["peak_extra_bytes"] = mem
        return timing

    def peak_extra_bytes(self, fn, setup=None):
        """Peak allocated GPU memory during fn() above what was allocated before (None on CPU)."""
        if setup is not None:
            setup()
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - before

    def copy_bandwidth_gbs(self, nbytes, repeats=10):
        src = torch.ones(nbytes // 4, device=self.device)
        dst = torch.empty_like(src)
        t = self.time(lambda: dst.copy_(src), repeats)
        return 2 * nbytes / t["min_s"] / 1e9  # read + write


def attempt(fn):
    """Runs fn(); returns (value, None) or (None, a description of the failure)."""
    try:
        return fn(), None
    except torch.OutOfMemoryError as error:
        return None, "out of memory: " + str(error).splitlines()[0]
    except RuntimeError as error:
        return None, "error: " + str(error).splitlines()[0]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- the cases


def cases(ft, pre, hess, dtype):
    """(name, ours, baseline or None, setup or None, bytes moved by ours)."""
    n = sum(t.numel() for t in ft)
    w = ft[0].element_size()
    triple = n * (2 * w + 4)  # one read of finetuned, pretrained, hessian
    k = ops.num_reset_for(n, RESERVE_RATIO)
    threshold = ops.score_threshold(ft, pre, hess, k, EPS)
    backup = None

    def restore():
        torch._foreach_copy_(ft, backup)

    def ensure_backup():
        nonlocal backup
        if backup is None:
            backup = [t.clone() for t in ft]

    out = []

    def histogram_pass():
        OPS.score_histogram(ft, pre, hess, EPS, 0, 0)

    out.append(("score_histogram (one pass)", histogram_pass, None, None, triple))

    # The list op: one allocation and one launch per 64 tensors. A drift_score call per tensor
    # reached 15 % of copy bandwidth at 125M (f1ac2c7, H200), likely the host's cost per call.
    def drift_scores():
        ops.drift_scores(ft, pre, hess, EPS)

    def drift_scores_torch():
        for f, p, h in zip(ft, pre, hess):
            ref.drift_score(f, p, h, EPS)

    def drift_scores_foreach():  # the same float32 math in multi-tensor launches (hessians >= 0 here)
        f32 = ft if w == 4 else [f.float() for f in ft]
        p32 = pre if w == 4 else [p.float() for p in pre]
        scores = torch._foreach_sub(f32, p32)
        torch._foreach_mul_(scores, scores)
        torch._foreach_div_(scores, torch._foreach_add(hess, EPS))

    out.append(("drift_scores", drift_scores, {"per_tensor": drift_scores_torch, "foreach": drift_scores_foreach},
                None, n * (2 * w + 8)))

    def threshold_ours():
        ops.score_threshold(ft, pre, hess, k, EPS)

    def threshold_kthvalue():
        ref.fast_score_threshold(ft, pre, hess, k, EPS)[0].item()

    def threshold_radix():
        ref.radix_score_threshold(ft, pre, hess, k, EPS)

    def threshold_topk():
        ref.topk_score_threshold(ft, pre, hess, k, EPS)

    # The sort-based selections cost seconds per call at 1B+ elements (torch.kthvalue: ~9.5 s at
    # 1.3B on an H100) and would eat a GPU lease: run where they take well under a second.
    m = min(k, n - k + 1)
    topk = threshold_topk if m <= SORT_BASELINE_MAX else f"not run: {m} candidates (> {SORT_BASELINE_MAX})"
    kth = threshold_kthvalue if n <= SORT_BASELINE_MAX else f"not run: {n} scores (> {SORT_BASELINE_MAX})"
    out.append(("score_threshold", threshold_ours,
                {"radix_bincount": threshold_radix, "chunked_topk": topk, "flat_kthvalue": kth},
                None, 3 * triple))

    # purify_'s search from a sample: an even sample brackets the threshold, one score_candidates
    # pass counts and keeps the keys around it; where the range holds more keys than a pass may keep
    # (billions of weights), a second keeps the bin of keys that holds it.
    from finepurify_ext.purify import Feed, PurifyConfig, Scoring

    one_pass_config = PurifyConfig(reserve_ratio=RESERVE_RATIO, count_moved_only=False)
    scoring = Scoring(hess, EPS, ops.PLAIN)

    def threshold_sampled():
        got, passes = search_from_sample(Feed(ft, pre, scoring), scoring, one_pass_config, n, k)
        if got != threshold:
            raise RuntimeError(f"the sampled search's threshold {got} differs from score_threshold's {threshold}")
        return passes

    passes = threshold_sampled()  # how many it takes here: the bytes it moves
    out.append((f"score_threshold (sample + {passes} pass{'es' if passes > 1 else ''})", threshold_sampled,
                None, None, passes * triple))

    def reset_pass():
        ops.masked_reset_(ft, pre, hess, threshold, EPS)

    out.append(("masked_reset_ (one pass)", reset_pass, None, "restore", triple + (n - k) * w))

    def detect_and_reset():
        ops.reset_most_abnormal_(ft, pre, hess, RESERVE_RATIO, EPS).sum().item()

    def detect_and_reset_torch():
        ref.fast_reset_most_abnormal_(ft, pre, hess, RESERVE_RATIO, EPS).sum().item()

    def detect_and_reset_radix():
        ref.radix_reset_most_abnormal_(ft, pre, hess, RESERVE_RATIO, EPS).sum().item()

    out.append(("detect_and_reset", detect_and_reset,
                {"radix_bincount_where": detect_and_reset_radix,
                 "flat_kthvalue_where": detect_and_reset_torch if n <= SORT_BASELINE_MAX else kth},
                "restore", 4 * triple + (n - k) * w))

    def detect_and_reset_sampled():  # the op's own search from a sample ("auto" takes it on the CPU only)
        ops.reset_most_abnormal_(ft, pre, hess, RESERVE_RATIO, EPS, search="sample").sum().item()

    out.append((f"detect_and_reset (search='sample', {passes} candidates pass{'es' if passes > 1 else ''})",
                detect_and_reset_sampled, None, "restore", (passes + 1) * triple + (n - k) * w))  # baselines: the row above
    # Gradients in the weights' dtype: `pre` serves (not modified), so no extra memory. Runs
    # last, since it changes the hessians.
    grads = pre

    def accumulate():
        ops.accumulate_sq_grads_(hess, grads, 1.0)

    def accumulate_foreach():
        ref.fast_accumulate_sq_grads_(hess, grads, 1.0)

    def accumulate_per_tensor():  # mixed-dtype addcmul_ promotes inside one kernel per tensor
        for h, g in zip(hess, grads):
            h.addcmul_(g, g)

    out.append(("accumulate_sq_grads_", accumulate,
                {"foreach_addcmul": accumulate_foreach, "per_tensor_addcmul": accumulate_per_tensor},
                None, n * (w + 8)))
    return out, ensure_backup, restore


def run_size(dev, size, dtype_name, repeats, bandwidth, baseline_budget_s, unmoved=0.0):
    shapes = decoder_shapes(**MODELS[size])
    dtype = getattr(torch, dtype_name)
    ft, pre, hess = make_model(shapes, dtype, dev.device, unmoved=unmoved)
    n = sum(t.numel() for t in ft)
    print(f"\n{size} {dtype_name}: {len(shapes)} tensors, {n / 1e9:.3f}B parameters")
    rows = []
    the_cases, ensure_backup, restore = cases(ft, pre, hess, dtype)
    for name, ours, baselines, setup_name, moved in the_cases:
        setup = None
        if setup_name == "restore":
            ensure_backup()
            setup = restore
        t_ours, error = attempt(lambda: dev.time(ours, repeats, setup))
        if error is not None:  # e.g. drift_scores' output for a 7B model on an 80 GB GPU
            print(f"  {name:28s} failed: {error}")
            rows.append({"model": size, "case": name, "weight_dtype": dtype_name, "parameters": n, "failed": error})
            continue
        mem_ours = dev.peak_extra_bytes(ours, setup)
        row = {
            "model": size, "case": name, "weight_dtype": dtype_name, "parameters": n,
            "ours": t_ours, "bytes_moved": int(moved),
            "gbs": round(moved / t_ours["median_s"] / 1e9, 1),
            "fraction_of_copy_bandwidth": round(moved / t_ours["median_s"] / 1e9 / bandwidth, 3),
            "peak_extra_bytes_ours": mem_ours,
        }
        line = (f"  {name:28s} {t_ours['median_s'] * 1e3:9.3f} ms {row['gbs']:8.1f} GB/s "
                f"({row['fraction_of_copy_bandwidth'] * 100:5.1f} % of copy)")
        if mem_ours is not None:
            line += f"  extra {mem_ours / 2**20:8.1f} MiB"
        if baselines:
            row["pure_pytorch"] = {}
            best = None
            for base_name, base in baselines.items():
                if isinstance(base, str):
                    row["pure_pytorch"][base_name] = {"not_run": base}
                    continue
                timing, error = attempt(lambda: dev.time_bounded(base, repeats, setup, baseline_budget_s))
                row["pure_pytorch"][base_name] = timing if error is None else {"failed": error}
                if error is None:
                    if best is None or timing["median_s"] < best[1]:
                        best = (base_name, timing["median_s"])
            if best is not None:
                row["best_pure_pytorch"] = best[0]
                row["speedup"] = round(best[1] / t_ours["median_s"], 2)
                line += f"  pure PyTorch ({best[0]}) x{row['speedup']:.2f}"
            else:
                row["speedup"] = None
                line += "  pure PyTorch failed: " + "; ".join(v["failed"] for v in row["pure_pytorch"].values())
        print(line, flush=True)
        rows.append(row)
    del ft, pre, hess, the_cases
    return rows


def check_targets(rows):
    """The GPU-core issue's targets, each with the measured figure."""
    checks = []
    for r in rows:
        big = r["parameters"] >= 1e9
        if "failed" in r:  # recorded in its row (e.g. an output that does not fit): nothing measured
            continue
        if big and r["case"] != "detect_and_reset":
            checks.append({"target": f"{r['model']} {r['weight_dtype']} {r['case']}: >= 80 % of copy bandwidth",
                           "measured": r["fraction_of_copy_bandwidth"], "met": r["fraction_of_copy_bandwidth"] >= 0.8})
        if r["case"] == "detect_and_reset" and big:
            checks.append({"target": f"{r['model']} {r['weight_dtype']} detect_and_reset faster than the best pure "
                                     "PyTorch", "measured": r.get("speedup"),
                           "met": (r.get("speedup") or float("inf")) > 1})
        if r["case"] == "detect_and_reset" and r["model"] == "7b" and r["peak_extra_bytes_ours"] is not None:
            checks.append({"target": "7b bfloat16 detect_and_reset < 64 MB extra GPU memory",
                           "measured": r["peak_extra_bytes_ours"], "met": r["peak_extra_bytes_ours"] < 64 * 2**20})
        if r["case"] == "accumulate_sq_grads_" and r.get("speedup") is not None and r["model"] != "tiny":
            need = 1.0 if r["weight_dtype"] == "float32" else 1.5
            checks.append({"target": f"{r['model']} accumulate_sq_grads_ {r['weight_dtype']} grads >= {need}x the "
                                     "best pure PyTorch", "measured": r["speedup"], "met": r["speedup"] >= need})
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", default=["125m", "1.3b", "7b"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--baseline-budget-s", type=float, default=2.0,
                        help="seconds of repeats per pure-PyTorch baseline (a slower one is timed once)")
    parser.add_argument("--unmoved", type=float, default=0.0,
                        help="the fraction of weights that never moved, beyond what rounding leaves (default 0)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cuda_ops.json"))
    args = parser.parse_args()
    if not 0.0 <= args.unmoved < 1.0:
        parser.error(f"--unmoved must be in [0, 1), got {args.unmoved}")
    dev = Device(args.device)
    if dev.cuda and not torch.cuda.is_available():
        sys.exit("bench_cuda: no CUDA device; use --device cpu for a smoke run")
    if dev.cuda and not finepurify_ext.built_with_cuda():
        sys.exit("bench_cuda: finepurify_ext was built without CUDA kernels (rebuild with nvcc present)")
    name = torch.cuda.get_device_name() if dev.cuda else "CPU"
    bandwidth = dev.copy_bandwidth_gbs(4 << 30 if dev.cuda else 256 << 20)
    print(f"{name}: measured copy bandwidth {bandwidth:.1f} GB/s (read + write)")
    rows = []
    for size in args.sizes:
        for dtype_name in DTYPES[size]:
            rows += run_size(dev, size, dtype_name, args.repeats, bandwidth, args.baseline_budget_s, args.unmoved)
    checks = check_targets(rows)
    for c in checks:
        print(f"{'met ' if c['met'] else 'MISSED'}  {c['target']}: {c['measured']}")
    report = {
        "command": "python bench/bench_cuda.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": name,
        "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if dev.cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "finepurify_ext": finepurify_ext.__version__,
        "finepurify_ext_from": os.path.dirname(os.path.abspath(finepurify_ext.__file__)),
        "reserve_ratio": RESERVE_RATIO,
        "unmoved": args.unmoved,
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "timing": ("CUDA events" if dev.cuda else "perf_counter") + ", median after 2 warm-up runs; baselines: one warm-up, then repeats within --baseline-budget-s",
        "results": rows,
        "targets": checks,
    }
    write_json_atomically(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
