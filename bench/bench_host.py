"""purify_'s host cost beyond the op, at a real model's tensor count.

On a GPU, purify_ at OPT-1.3B shape took 1.4-2.1x the op's time while the device did only ~0.7 ms
more work (bench/results/pipeline_cuda*.json): the rest is the host's Python and dispatch per call
and per tensor, before the first pass, between passes and after the last. This measures that cost
without a GPU: the model has the real model's layers and tensors (OPT-1.3B: 24 layers, 388
tensors) at tiny widths, so the passes cost next to nothing and a call's time is its host time.
Reported per ranking: purify_'s median time, the op's (``ops.reset_most_abnormal_`` over the same
tensors, what bench_pipeline compares against), their difference, and the host time inside each of
purify_'s steps (a step's time includes the ops it calls). A proxy, not a GPU timing: a CUDA launch
adds a few microseconds per device op on top.

    python bench/bench_host.py                                  # bench/results/host_overhead_cpu.json
    # another tree's Python layer over this build (the row records where the package came from):
    mkdir -p /tmp/base && git archive REV finepurify_ext | tar -x -C /tmp/base && cp finepurify_ext/_C*.so /tmp/base/finepurify_ext/
    FINEPURIFY_COMMIT=REV PYTHONPATH=/tmp/base python bench/bench_host.py --label REV
"""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import os
import platform
import sys
import time

import torch

from common import git_commit, median_ms, source_digest, write_json_atomically

import finepurify_ext.purify as purify_module
from finepurify_ext import ops
from finepurify_ext.purify import RANKINGS, PurifyConfig, matched_parameters, purify_, scoring_for, word_embedding_name

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUTS = {  # OPT layers and tensor lists at tiny widths
    "opt-1.3b": dict(num_hidden_layers=24),
    "opt-125m": dict(num_hidden_layers=12),
}
STEPS = ["matched_parameters", "scoring_for", "Feed", "_candidate_pass", "_plot_sample", "_gather", "zero_hessian_rows",
         "search_ranges", "threshold_from_histograms", "reset_moved_rows_"]


def build(layout: str, device):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=1000, max_position_embeddings=64,
                       word_embed_proj_dim=32, **LAYOUTS[layout])
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(config).to(torch.bfloat16).eval()
    params = dict(model.named_parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    pre = {n: (p - torch.randn(p.shape, generator=gen, device=device).to(p.dtype) * 1e-2).detach()
           for n, p in params.items()}
    hessians = {n: torch.rand(p.shape, generator=gen, device=device) for n, p in params.items()}
    return model, params, pre, hessians


@functools.lru_cache(maxsize=None)
def _timed_steps():
    """Wraps purify_'s steps (module globals it looks up per call) to add their host time to SPENT."""
    for name in STEPS:
        fn = getattr(purify_module, name)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                SPENT[_name] += time.perf_counter() - start
        setattr(purify_module, name, timed)


SPENT = collections.defaultdict(float)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="opt-1.3b", choices=list(LAYOUTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1: steadier)")
    parser.add_argument("--label", default=None, help="the row's label (default: the commit)")
    parser.add_argument("--one-pass", action="store_true",
                        help="the one-pass threshold search even at these tiny widths (purify.CANDIDATES_MIN_WEIGHTS "
                             "set to 0): what its sample costs the host")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "host_overhead_cpu.json"),
                        help="added to this file's runs where it exists (one row per label)")
    args = parser.parse_args()
    if args.one_pass:
        purify_module.CANDIDATES_MIN_WEIGHTS = 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, params, pre, hessians = build(args.layout, device)
    backup = {n: p.detach().clone() for n, p in params.items()}
    scored, _ = matched_parameters(model, pre)
    embedding = word_embedding_name(model)
    ranked = [n for n in scored if n != embedding]
    ft_ranked, pre_ranked = [params[n] for n in ranked], [pre[n] for n in ranked]

    def restore():
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(backup[n])

    def timed_ms(fn):
        return median_ms(fn, device, args.repeats, warmup=5, setup=restore)

    rows = {}
    _timed_steps()
    for ranking in RANKINGS:
        config = PurifyConfig(ranking=ranking)
        scoring = scoring_for(config, ranked, [hessians[n] for n in ranked])

        def op():
            with torch.no_grad():
                return ops.reset_most_abnormal_(ft_ranked, pre_ranked, scoring.hessians, config.reserve_ratio,
                                                scoring.eps, ranking=scoring.ranking, count_moved_only=True).sum().item()

        op_ms = timed_ms(op)
        SPENT.clear()
        purify_ms = timed_ms(lambda: purify_(model, pre, hessians, config))
        calls = 5 + args.repeats
        steps = {k: round(v / calls * 1e3, 3) for k, v in sorted(SPENT.items(), key=lambda kv: -kv[1])}
        rows[ranking] = {"purify_ms": round(purify_ms, 3), "op_ms": round(op_ms, 3),
                         "beyond_op_ms": round(purify_ms - op_ms, 3), "steps_ms": steps}
        print(f"{ranking:15s} purify_ {purify_ms:7.2f} ms  op {op_ms:6.2f} ms  beyond the op {purify_ms - op_ms:6.2f} ms",
              flush=True)
        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()), flush=True)

    import json
    document = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            document = json.load(f)
    label = args.label or git_commit()
    document.setdefault("runs", {})[label] = {
        "command": "python bench/bench_host.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "source_digest": source_digest(), "package": os.path.dirname(purify_module.__file__),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__, "threads": args.threads,
        "layout": args.layout, "tensors": len(params), "repeats": args.repeats, "rankings": rows,
    }
    document["what"] = ("purify_ against the op at a real model's tensor count and tiny widths: the host's cost "
                        "per call (milliseconds, medians); a proxy for the GPU gap, not a GPU timing")
    write_json_atomically(args.out, document)
    print("wrote", args.out)
    print("beyond the op (ms): " + ", ".join(f"{k} {v['beyond_op_ms']:.2f}" for k, v in rows.items()))


if __name__ == "__main__":
    main()
