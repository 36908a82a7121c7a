"""Instructions per vector step of each CUDA kernel, by static count of its compiled machine code.

No GPU needed: compiles csrc/cuda/*.cu of a source tree for one architecture with nvcc, disassembles
it with cuobjdump, and per kernel counts the instructions of its innermost loop that issues the most
16-byte loads (the vector path with a per-element Hessian: one step is 8 elements per thread). A
static count, not a timing: it says how much work an element costs the issue slots, which bounds
the passes that are not memory-bound (the bfloat16 histograms).

    python bench/sass_loop_sizes.py --cuobjdump PATH [--commit REV ...] [--out JSON]

cuobjdump comes with a CUDA toolkit, or from PyPI (nvidia-cuda-cuobjdump, its bin/ folder). Each
--commit adds a column for that commit's sources (`git archive`) beside the checkout's.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import git_commit, write_json_atomically  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BACK_EDGE = re.compile(r"BRA (0x[0-9a-f]+)")


def kernel_name(mangled: str) -> str:
    """e.g. score_histogram_kernel<BFloat16Bits, false, true> (c++filt, namespaces and parameters dropped)."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    name = re.sub(r"^void |\(.*$|finepurify::(cuda::)?(\(anonymous namespace\)::)?", "", name.split(">(")[0] + ">")
    return name.replace("finepurify::cuda::", "")


def vector_loop_size(sass: str) -> tuple[int, int] | None:
    """(instructions, 16-byte loads) of the innermost loop with the most 16-byte loads."""
    ins = [(int(a, 16), text.strip()) for a, text in INSTRUCTION.findall(sass)]
    loops = [(int(m.group(1), 16), a) for a, t in ins for m in [BACK_EDGE.search(t)] if m and int(m.group(1), 16) < a]
    best = None
    for lo, hi in loops:
        if any((lo, hi) != (l2, h2) and lo <= l2 and h2 <= hi for l2, h2 in loops):
            continue  # holds another loop: not innermost
        body = [t for a, t in ins if lo <= a <= hi]
        loads = sum("LDG.E.128" in t for t in body)
        if loads and (best is None or (loads, -len(body)) > (best[1], -best[0])):
            best = (len(body), loads)
    return best


def measure(source: str, cuobjdump: str, arch: str) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted(glob.glob(os.path.join(source, "csrc", "cuda", "*.cu"))):
            cubin = os.path.join(tmp, os.path.basename(cu) + ".cubin")
            subprocess.run(["nvcc", "-std=c++17", "-O3", "-fmad=false", "-gencode",
                            f"arch=compute_{arch},code=sm_{arch}", "-cubin", cu, "-o", cubin], check=True)
            sass = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
            for part in sass.split("Function : ")[1:]:
                size = vector_loop_size(part)
                if size:
                    rows[kernel_name(part.split()[0])] = {"instructions_per_step": size[0], "loads_16_bytes": size[1]}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuobjdump", required=True, help="path of cuobjdump")
    parser.add_argument("--commit", action="append", default=[], help="an older commit to compare")
    parser.add_argument("--arch", default="90")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "sass_loop_sizes.json"))
    args = parser.parse_args()
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    trees = {}
    for rev in args.commit:
        with tempfile.TemporaryDirectory() as tree:
            archive = subprocess.run(["git", "-C", os.path.dirname(HERE), "archive", rev, "csrc"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            trees[rev] = measure(tree, args.cuobjdump, args.arch)
    trees[git_commit()] = measure(os.path.dirname(HERE), args.cuobjdump, args.arch)
    labels = list(trees)
    names = sorted({k for rows in trees.values() for k in rows})
    print(f"{'kernel':62s}" + "".join(f"{label[:12]:>14s}" for label in labels))
    for k in names:
        print(f"{k[:62]:62s}" + "".join(f"{trees[l].get(k, {}).get('instructions_per_step', '-'):>14}" for l in labels))
    write_json_atomically(args.out, {
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "nvcc": nvcc, "arch": f"sm_{args.arch}",
        "what": "static SASS instructions of each kernel's innermost loop with the most 16-byte loads "
                "(one step: 8 elements per thread); not a timing",
        "trees": trees})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
