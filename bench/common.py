"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os
import subprocess

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


def write_json_atomically(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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


if __name__ == "__main__":
    print(git_commit(), source_digest())
