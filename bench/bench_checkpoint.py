"""Out-of-core purification of a generated sharded checkpoint: peak memory and read throughput,
against loading both models (and the Hessian) fully into memory and doing the same in pure PyTorch.

    python bench/bench_checkpoint.py                 # a 4.2 GB float32 model in 500 MB shards
    python bench/bench_checkpoint.py --size medium   # 1.3 GB: small enough for the in-memory baseline here
    python bench/bench_checkpoint.py --size small    # 0.4 GB, a quick look
    python bench/bench_checkpoint.py --size 3b --reserve 0.3 --modes out_of_core_default \
        out_of_core_default_million                  # 3.4B bf16 weights: the pre-pass's sample size

The checkpoint has LLaMA-like shapes (hidden 2048, MLP 5632, vocabulary 32000; largest tensor
262 MB). Each mode runs in a fresh subprocess so that its peak RSS (VmHWM) is its own; the memory
target is peak RSS <= 3 x the largest tensor + 200 MB. The in-memory pure-PyTorch mode is skipped,
and says so, when the machine has too little free memory for it. Writes
bench/results/checkpoint_ooc_<size>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import HERE, git_commit, status_kib, write_json_atomically  # noqa: E402

# "3b": OpenLLaMA-3B's shapes with bfloat16 weights (3.4B weights; 6.9 GB a model, 13.7 GB of float32
# Hessian): past the size whose threshold one pass holds with purify_'s million-weight sample.
SIZES = {"3b": {"layers": 26, "hidden": 3200, "mlp": 8640, "vocab": 32000, "dtype": "bfloat16"},
         "full": {"layers": 18, "hidden": 2048, "mlp": 5632, "vocab": 32000},
         "medium": {"layers": 4, "hidden": 2048, "mlp": 5632, "vocab": 32000},
         "small": {"layers": 2, "hidden": 1024, "mlp": 2816, "vocab": 32000},
         "tiny": {"layers": 1, "hidden": 64, "mlp": 160, "vocab": 1000, "dtype": "bfloat16"}}  # the tests' smoke run
SHARD_BYTES = 500 << 20
RESERVE_RATIO = 0.9


def shapes(size):
    s = SIZES[size]
    h, m = s["hidden"], s["mlp"]
    out = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                    p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                    p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (s["vocab"], h)})
    return out


def weight_bytes(size):
    """The bytes of one weight of the size's models (the Hessian's are float32)."""
    return 2 if SIZES[size].get("dtype") == "bfloat16" else 4


def generate(directory, size):
    """pre-trained, suspect (a sparse-ish drift) and hessian directories, sharded with indexes."""
    import torch
    from finepurify_ext.checkpoint import INDEX, ShardWriter
    from finepurify_ext.hessian import HESSIAN_FORMAT

    def write(name, tensor_of, file_format="pt"):
        d = os.path.join(directory, name)
        os.makedirs(d, exist_ok=True)
        dtype = getattr(torch, SIZES[size].get("dtype", "float32")) if name != "hessian" else torch.float32
        groups, current, used = [], [], 0
        for n, s in shapes(size).items():
            nbytes = dtype.itemsize * (s[0] * (s[1] if len(s) > 1 else 1))
            if current and used + nbytes > SHARD_BYTES:
                groups.append(current)
                current, used = [], 0
            current.append((n, dtype, s))
            used += nbytes
        groups.append(current)
        weight_map = {}
        for i, layout in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            writer = ShardWriter(os.path.join(d, file), layout, {"format": file_format})
            for n, _, s in layout:
                writer.write(n, tensor_of(n, s).to(dtype))
                weight_map[n] = file
            writer.close()
        with open(os.path.join(d, INDEX), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)

    def seeded(n, salt):
        return torch.Generator().manual_seed(zlib.crc32(f"{n}:{salt}".encode()))

    write("pretrained", lambda n, s: torch.randn(s, generator=seeded(n, 0)) * 0.02)
    write("suspect", lambda n, s: torch.randn(s, generator=seeded(n, 0)) * 0.02
          + torch.randn(s, generator=seeded(n, 1)) * 1e-3 * (torch.rand(s, generator=seeded(n, 2)) < 0.5))
    write("hessian", lambda n, s: torch.rand(s, generator=seeded(n, 3)) ** 4 * 1e-4, HESSIAN_FORMAT)


def rss_mb(field="VmHWM"):
    kib = status_kib(field)
    return float("nan") if kib is None else kib / 1024


def child(mode, directory, out, reserve):
    """One measured run; prints a JSON line."""
    import torch
    from finepurify_ext import reference
    from finepurify_ext.checkpoint import Checkpoint, purify_checkpoint
    from finepurify_ext.purify import PurifyConfig

    base_rss = rss_mb("VmRSS")
    paths = [os.path.join(directory, n) for n in ("pretrained", "suspect", "hessian")]
    read_bytes = sum(Checkpoint(p).nbytes for p in paths)
    start = time.perf_counter()
    if mode.startswith("out_of_core"):
        # out_of_core: the paper's literal setting (no pre-pass: three histogram passes). The default
        # configuration (Hessian floor, moved weights counted) has a pre-pass, which samples the
        # scores: one threshold pass; "_histograms" turns that off, for the comparison, and
        # "_million" brackets from purify_'s million-weight sample instead of the pre-pass's larger one.
        from finepurify_ext import checkpoint as checkpoint_module
        reserve = float(reserve)
        config = (PurifyConfig.literal(reserve_ratio=reserve) if mode == "out_of_core"
                  else PurifyConfig(reserve_ratio=reserve))
        if mode == "out_of_core_default_histograms":
            checkpoint_module.CANDIDATES_ON = ()
        if mode == "out_of_core_default_million":
            checkpoint_module.OUT_OF_CORE_SAMPLES = checkpoint_module.FLOOR_SAMPLES
        report = purify_checkpoint(*paths, out, config, overwrite=True, progress=False)
        bytes_read, num_reset = report.bytes_read, sum(report.reset_per_tensor.values())
        passes = {"threshold_passes": report.threshold_passes, "timings_s": report.timings_s}
    else:
        from safetensors.torch import load_file, save_file

        def load_all(p):
            return {k: v for f in Checkpoint(p).files for k, v in load_file(f).items()}

        pre, suspect, hessian = (load_all(p) for p in paths)
        names = list(suspect)
        ft, pr, hs = [suspect[n] for n in names], [pre[n] for n in names], [hessian[n] for n in names]
        reserve = float(reserve)
        if mode == "in_memory_pytorch":  # kthvalue: the fastest, but it copies all scores
            counts = reference.fast_reset_most_abnormal_(ft, pr, hs, reserve, 1e-8)
        else:  # topk of the k largest: leaner, for models whose scores cannot be copied
            k = reference.num_reset_for(sum(t.numel() for t in ft), reserve)
            flat, views = reference.fast_scores(ft, pr, hs, 1e-8)
            threshold = torch.topk(flat, k, sorted=False).values.min()
            counts = []
            for f, p, sc in zip(ft, pr, views):
                reset = sc >= threshold
                torch.where(reset, p, f, out=f)
                counts.append(int(reset.sum()))
        num_reset, bytes_read, passes = int(sum(int(c) for c in counts)), read_bytes, {}
        os.makedirs(out, exist_ok=True)
        save_file(suspect, os.path.join(out, "model.safetensors"))
    elapsed = time.perf_counter() - start
    print(json.dumps({"mode": mode, "time_s": elapsed, "peak_rss_mb": rss_mb(), "rss_after_imports_mb": base_rss,
                      "checkpoint_bytes_read": bytes_read, "input_bytes": read_bytes, "num_reset": num_reset,
                      "read_gb_per_s": bytes_read / elapsed / 1e9, "input_gb_per_s": read_bytes / elapsed / 1e9,
                      "torch": torch.__version__, "threads": torch.get_num_threads(), **passes}))


def mem_available_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--dir", default=None, help="where to generate the checkpoints (default: a temporary dir)")
    parser.add_argument("--modes", nargs="+", default=["out_of_core", "in_memory_pytorch", "in_memory_pytorch_topk"],
                        choices=["out_of_core", "out_of_core_default", "out_of_core_default_histograms",
                                 "out_of_core_default_million", "in_memory_pytorch", "in_memory_pytorch_topk"])
    parser.add_argument("--reserve", type=float, default=RESERVE_RATIO,
                        help="the reserve ratio (the share of moved weights kept; the default config's is 0.3)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the modes this many times, in turn (the page cache favours whichever ran last); "
                             "each mode's time is then the median, all of them listed")
    parser.add_argument("--out", default=None, help="default: bench/results/checkpoint_ooc_<size>.json")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "DIR", "OUT", "RESERVE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    args.out = args.out or os.path.join(HERE, "results", f"checkpoint_ooc_{args.size}.json")

    sh = shapes(args.size)
    largest = max(4 * s[0] * (s[1] if len(s) > 1 else 1) for s in sh.values())  # a float32 Hessian's
    model_bytes = sum(weight_bytes(args.size) * s[0] * (s[1] if len(s) > 1 else 1) for s in sh.values())
    target_mb = 3 * largest / 2**20 + 200
    work = args.dir or tempfile.mkdtemp(prefix="fp_ckpt_")
    if not os.path.isdir(os.path.join(work, "hessian")):
        start = time.perf_counter()
        generate(work, args.size)
        print(f"generated 2 x {model_bytes / 1e9:.2f} GB and a Hessian in {time.perf_counter() - start:.0f} s under {work}")
    results = {"command": "python bench/bench_checkpoint.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "commit": git_commit(), "size": args.size, "model_bytes": model_bytes, "largest_tensor_bytes": largest,
               "tensors": len(sh), "shard_bytes": SHARD_BYTES, "reserve_ratio": args.reserve,
               "memory_target_mb": target_mb, "runs": {}}
    for mode in [m for _ in range(args.repeats) for m in args.modes]:
        # inputs + scores + kthvalue's copy of them, or topk's k values and indices
        extra = model_bytes if mode == "in_memory_pytorch" else 3 * (1 - args.reserve) * model_bytes
        need_mb = (4 * model_bytes + extra) / 2**20 * 1.05
        if mode == "in_memory_pytorch" and mem_available_mb() < need_mb:
            results["runs"][mode] = {"skipped": f"needs about {need_mb / 1024:.2f} GiB free, "
                                                f"{mem_available_mb() / 1024:.2f} GiB available"}
            print(f"{mode}: skipped ({results['runs'][mode]['skipped']})")
            continue
        out = os.path.join(work, f"out_{mode}")
        proc = subprocess.run([sys.executable, __file__, "--child", mode, work, out, str(args.reserve)], capture_output=True, text=True)
        if proc.returncode != 0:
            results["runs"][mode] = {"failed": proc.stderr[-2000:], "returncode": proc.returncode}
            print(f"{mode}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        earlier = results["runs"].get(mode, {})
        run["times_s"] = earlier.get("times_s", []) + [run["time_s"]]
        run["peak_rss_mb"] = max(run["peak_rss_mb"], earlier.get("peak_rss_mb", 0.0))
        run["time_s"] = statistics.median(run["times_s"])
        run["read_gb_per_s"] = run["checkpoint_bytes_read"] / run["time_s"] / 1e9
        run["input_gb_per_s"] = run["input_bytes"] / run["time_s"] / 1e9
        results["runs"][mode] = run
        print(f"{mode}: {run['times_s'][-1]:.1f} s (median so far {run['time_s']:.1f} s, "
              f"{run.get('threshold_passes', '-')} threshold passes), peak RSS "
              f"{run['peak_rss_mb']:.0f} MB, {run['input_gb_per_s']:.2f} GB/s of checkpoint input "
              f"({run['read_gb_per_s']:.2f} GB/s read in all)")
    ooc = results["runs"].get("out_of_core", {})
    in_memory = [r for m, r in results["runs"].items() if m.startswith("in_memory") and "time_s" in r]
    mem = min(in_memory, key=lambda r: r["time_s"]) if in_memory else {}  # the best pure-PyTorch run
    if "peak_rss_mb" in ooc:
        results["memory_target_met"] = ooc["peak_rss_mb"] <= target_mb
        print(f"memory target (<= 3 x {largest / 2**20:.0f} MB + 200 MB = {target_mb:.0f} MB): "
              f"{'met' if results['memory_target_met'] else 'MISSED'} at {ooc['peak_rss_mb']:.0f} MB")
    if "time_s" in ooc and "time_s" in mem:
        results["out_of_core_speed_ratio"] = mem["time_s"] / ooc["time_s"]
        results["out_of_core_memory_ratio"] = ooc["peak_rss_mb"] / mem["peak_rss_mb"]
        results["compared_with"] = mem["mode"]
        if any(r["num_reset"] != ooc["num_reset"] for r in in_memory):
            results["mismatch"] = "the modes reset different numbers of weights"
    write_json_atomically(args.out, results)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
