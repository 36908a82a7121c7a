"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit() -> str:
    """HEAD, with "+dirty" when the working tree has uncommitted changes to tracked files
    (FINEPURIFY_COMMIT overrides it, for a copy of the tree without .git, as on a lent GPU)."""
    if os.environ.get("FINEPURIFY_COMMIT"):
        return os.environ["FINEPURIFY_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def source_digest() -> str:
    """SHA-256 over the package's, kernels', benchmarks' and tests' source files (names and bytes):
    what ran, even where a copy of the tree carries stale git metadata (as on a lent GPU); compare
    with ``python bench/common.py`` in a checkout."""
    import hashlib

    root = os.path.dirname(HERE)
    digest = hashlib.sha256()
    for top in ("finepurify_ext", "csrc", "bench", "tests"):
        for folder, dirs, files in sorted(os.walk(os.path.join(root, top))):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "baseline_src", "results"))
            for name in sorted(files):
                if name.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".sh")):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode() + b"\0")
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()[:16]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for a result's machine."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json_atomically(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def median_ms(fn, device, repeats: int, warmup: int = 2, setup=None) -> float:
    """The median wall time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` more, with
    ``setup()`` (untimed) before each; on a GPU the device is synchronised around each run."""
    import statistics

    times = []
    for r in range(warmup + repeats):
        if setup is not None:
            setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def search_from_sample(feed, scoring, config, total: int, k: int) -> tuple[float, int]:
    """purify_'s exact threshold search from a sample over a ``purify.Feed`` of ``total`` weights
    (``purify._candidate_pass``, then ``threshold.search_ranges``): the k-th largest score and the
    score_candidates passes it took (the ops' own search takes the same ones)."""
    from finepurify_ext import purify
    from finepurify_ext.threshold import search_ranges

    passes = 1

    def more(*range_args):
        nonlocal passes
        passes += 1
        return feed.candidates(*range_args)

    first = purify._candidate_pass(feed, scoring, config, total)
    return search_ranges(first, more, k, total, purify.CANDIDATE_KEYS), passes


def run_cells(args, results: dict, measure_cell):
    """The defence tables' resumable loop: ``measure_cell(attack, seed, args, results, save)`` for
    every seed and attack of ``args`` (none with ``args.summary_only``), seed-major so that a run cut
    off still covers every attack; ``save()`` writes ``results`` to ``args.out`` atomically after
    each run, and the next invocation skips what is there. Returns ``save``."""
    def save():
        write_json_atomically(args.out, results)

    if not args.summary_only:
        for seed in args.seeds:
            for attack in args.attacks:
                print(f"{attack}, seed {seed}", flush=True)
                measure_cell(attack, seed, args, results, save)
    return save


def sync(device):
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM: the resident set and its peak), or None."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_extra(device, fn):
    """(seconds, peak memory above what was in use before, fn's result): on CUDA the allocator's
    peak; on the CPU the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)."""
    if device.type != "cuda":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = status_kib("VmRSS")
        except OSError:
            before = None
        seconds, out = timed(device, fn)
        peak = status_kib("VmHWM") if before is not None else None
        return seconds, None if peak is None else (peak - before) * 1024, out
    import torch

    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds, out = timed(device, fn)
    return seconds, torch.cuda.max_memory_allocated(device) - before, out


if __name__ == "__main__":
    print(git_commit(), source_digest())
