"""Where the CUDA kernels spend their time, by Nsight Compute: for one launch of every kernel of every
pass (level-0 and level-1 histograms, masked reset, drift scores, accumulation), in float32 and
bfloat16 over a decoder-shaped list of tensors, the achieved DRAM throughput, issue-slot use,
occupancy, registers and the warp stall reasons. The question it answers: is a pass bound by memory,
by instructions, or by latency (and which)?

    python bench/ncu_kernels.py --out bench/results/ncu_kernels.json [--size 125m] [--ncu PATH] [--unmoved F]

Runs itself again under `ncu` (found on PATH or in /usr/local/cuda*/bin) with the SpeedOfLight,
Occupancy, LaunchStats, WarpStateStats and SourceCounters (branches, divergence) sections, then
writes one JSON row per profiled launch. ``--unmoved``: the fraction of weights that never moved
(bench_cuda.py's), where a bfloat16 fine-tune has many. ``--sass REGEX`` (repeatable) also profiles
the first launch whose demangled name matches, instruction by instruction (the source page's SASS
view): how many of a warp's 32 threads ran each instruction, so a divergence is found at the
instruction that causes it rather than guessed from the kernel's average.
Exits 0 with a note when there is no GPU or no ncu. Kernels are replayed with their memory
restored, so a 125M-parameter list (the default) keeps the run within a minute or two.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import git_commit, write_json_atomically  # noqa: E402

CHILD = "FINEPURIFY_NCU_CHILD"
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SourceCounters")
KERNELS = "regex:score_histogram|masked_reset|drift_score|accumulate_sq_grads"
EPS = 1e-8


def drive(size: str, device: str, unmoved: float = 0.0) -> None:
    """One call of each pass per dtype (the profiled launches)."""
    from bench_cuda import MODELS, decoder_shapes, make_model
    from finepurify_ext import ops

    shapes = decoder_shapes(**MODELS[size])
    for dtype in (torch.float32, torch.bfloat16):
        ft, pre, hess = make_model(shapes, dtype, torch.device(device), unmoved=unmoved)
        level0 = ops.score_histogram(ft, pre, hess, EPS, 0, 0)
        top = int(torch.nonzero(level0[:-2]).flatten()[-1])  # the highest populated bin: a real level-1 prefix
        ops.score_histogram(ft, pre, hess, EPS, 1, top)
        threshold = ops.score_threshold(ft, pre, hess, max(1, sum(f.numel() for f in ft) // 3), EPS)
        ops.masked_reset_(ft, pre, hess, threshold, EPS)
        ops.drift_scores(ft, pre, hess, EPS)
        ops.accumulate_sq_grads_(hess, pre, 1.0)
        if device == "cuda":
            torch.cuda.synchronize()
        del ft, pre, hess


def find_ncu(given: str | None) -> str | None:
    if given:
        return given
    return shutil.which("ncu") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/ncu"), reverse=True)), None)


def parse(details_csv: str) -> list[dict]:
    """ncu --csv --page details: one row per (launch, section, metric) -> one dict per launch."""
    lines = [line for line in details_csv.splitlines() if line.startswith('"')]  # drops ==PROF== lines
    launches: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        launch = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"], "grid": row.get("Grid Size"),
                                                 "block": row.get("Block Size"), "metrics": {}})
        name = f'{row["Section Name"]}: {row["Metric Name"]}' + (f' ({row["Metric Unit"]})' if row.get("Metric Unit") else "")
        launch["metrics"][name] = row["Metric Value"]
    return [dict(id=int(k), **v) for k, v in sorted(launches.items(), key=lambda kv: int(kv[0]))]


def parse_source(source_csv: str) -> dict:
    """ncu --page source --csv --print-source sass (one launch): per SASS instruction its warp-level
    and thread-level executions -> the kernel's name, every executed instruction as [address, SASS,
    warp instructions, thread instructions, predicated-on thread instructions, divergent branches,
    stall samples], and the instructions that leave the most of a warp's lanes idle."""
    rows = list(csv.reader(line for line in source_csv.splitlines() if line.startswith('"')))
    kernel = next((row[1] for row in rows if len(row) > 1 and row[0] == "Kernel Name"), None)
    header_at = next((i for i, row in enumerate(rows) if row and row[0].lstrip("# ") == "Address"), None)
    if header_at is None:
        raise ValueError("no source table (a row starting with Address) in ncu's output")
    header = [h.lstrip("# ") for h in rows[header_at]]

    def column(*names):
        return next((header.index(n) for n in names if n in header), None)

    at = {"address": column("Address"), "sass": column("Source", "SASS Source"),
          "inst": column("Instructions Executed"), "threads": column("Thread Instructions Executed"),
          "pred_on": column("Predicated-On Thread Instructions Executed"),
          "divergent": column("Divergent Branches"), "samples": column("Warp Stall Sampling (All Samples)")}
    if at["inst"] is None or at["threads"] is None:
        raise ValueError(f"the source table has no instruction counts; its columns: {header}")

    def number(row, key):
        i = at[key]
        if i is None or i >= len(row) or not row[i].strip():
            return 0
        return int(float(row[i].replace(",", "")))

    table = []
    for row in rows[header_at + 1:]:
        if len(row) != len(header):
            continue
        inst = number(row, "inst")
        if inst:
            table.append([row[at["address"]], row[at["sass"]].strip(), inst, number(row, "threads"),
                          number(row, "pred_on"), number(row, "divergent"), number(row, "samples")])
    warp_inst = sum(r[2] for r in table)
    thread_inst = sum(r[3] for r in table)
    idle = sorted(table, key=lambda r: 32 * r[2] - r[3], reverse=True)[:30]
    return {"kernel": kernel, "columns": ["address", "sass", "warp_inst", "thread_inst", "pred_on_thread_inst",
                                          "divergent_branches", "stall_samples"],
            "warp_instructions": warp_inst, "thread_instructions": thread_inst,
            "active_threads_per_instruction": round(thread_inst / warp_inst, 2) if warp_inst else None,
            "most_idle_lanes": [r + [round(r[3] / r[2], 2)] for r in idle], "instructions": table}


def profile_sass(ncu: str, pattern: str, size: str, unmoved: float) -> dict:
    """The first launch matching ``pattern`` (demangled name) profiled once, its source page read back."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "sass")
        command = [ncu, "--kernel-name-base", "demangled", "--kernel-name", f"regex:{pattern}", "--launch-count", "1",
                   "--section", "SourceCounters", "--section", "WarpStateStats", "--export", report, "--force-overwrite",
                   sys.executable, os.path.abspath(__file__), "--size", size, "--unmoved", str(unmoved)]
        run = subprocess.run(command, env={**os.environ, CHILD: "1"}, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(report + ".ncu-rep"):
            return {"pattern": pattern, "error": f"ncu rc {run.returncode}: {(run.stderr or run.stdout)[-1500:]}"}
        page = subprocess.run([ncu, "--import", report + ".ncu-rep", "--page", "source", "--csv", "--print-source", "sass"],
                              capture_output=True, text=True)
        try:
            return {"pattern": pattern, **parse_source(page.stdout)}
        except ValueError as error:
            return {"pattern": pattern, "error": f"{error} (rc {page.returncode}): {(page.stderr or page.stdout)[-1500:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="125m", help="a model of bench_cuda.py (default 125m)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "ncu_kernels.json"))
    parser.add_argument("--ncu", default=None, help="path of ncu (default: PATH, then /usr/local/cuda*/bin)")
    parser.add_argument("--launches", type=int, default=40, help="launches to profile at most")
    parser.add_argument("--unmoved", type=float, default=0.0, help="the fraction of weights that never moved")
    parser.add_argument("--sass", action="append", default=[], metavar="REGEX",
                        help="also profile the first launch whose demangled name matches, per SASS instruction "
                             "(e.g. 'score_histogram_kernel<BFloat16Bits'); repeatable")
    args = parser.parse_args()
    if os.environ.get(CHILD):
        drive(args.size, "cuda" if torch.cuda.is_available() else "cpu", args.unmoved)
        return
    if not torch.cuda.is_available():
        print("ncu_kernels: no GPU here; nothing profiled")
        return
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("ncu_kernels: no ncu found (PATH, /usr/local/cuda*/bin); give --ncu PATH")
        return
    command = [ncu, "--csv", "--page", "details", "--kernel-name", KERNELS, "--launch-count", str(args.launches)]
    for section in SECTIONS:
        command += ["--section", section]
    command += [sys.executable, os.path.abspath(__file__), "--size", args.size, "--unmoved", str(args.unmoved)]
    result = subprocess.run(command, env={**os.environ, CHILD: "1"}, capture_output=True, text=True)
    launches = parse(result.stdout)
    if result.returncode != 0 or not launches:
        sys.exit(f"ncu_kernels: ncu failed (rc {result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
    write_json_atomically(args.out, {
        "command": "python bench/ncu_kernels.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "ncu": subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:],
        "size": args.size, "unmoved": args.unmoved, "sections": list(SECTIONS), "launches": launches,
        "sass": [profile_sass(ncu, pattern, args.size, args.unmoved) for pattern in args.sass]})
    for launch in launches:
        m = launch["metrics"]
        pick = {k.split(": ", 1)[1]: v for k, v in m.items()
                if any(s in k for s in ("DRAM Throughput", "Duration", "Issue Slots Busy", "Achieved Occupancy",
                                        "Registers Per Thread", "Active Threads Per Warp", "Branch Efficiency"))}
        print(launch["kernel"][:70], pick)
    for sass in json.load(open(args.out))["sass"]:
        print("sass", sass["pattern"], sass.get("error") or
              f'{sass["active_threads_per_instruction"]} active threads per instruction; most idle lanes at '
              + ", ".join(f"{r[0]} {r[1][:40]} ({r[-1]})" for r in sass["most_idle_lanes"][:5]))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
