#!/usr/bin/env bash
# Compile-time kernel variants measured side by side on one GPU, to tune the build-time choices of
# csrc/cuda (FP_PACKS_PER_STEP, FP_HISTOGRAM_BLOCKS_PER_SM, FP_BALANCED_GRID, FP_SECTOR_STORES,
# FP_ACCUMULATE_QUADS) in one call: each variant is a copy
# of the sources built in place with its nvcc flags (the builds run in parallel), then
# bench/bench_cuda.py runs on each in turn, in the same process conditions.
#
#   bash bench/gpu_variants.sh OUT_DIR NAME=FLAGS ...
#   bash bench/gpu_variants.sh "$OUT" default= packs2=-DFP_PACKS_PER_STEP=2 hist6=-DFP_HISTOGRAM_BLOCKS_PER_SM=6
#
# (The device tool returns at most 8 files from $OUT: N variants write N + 1.)
# Writes OUT_DIR/cuda_ops_variant_NAME.json per variant and OUT_DIR/gpu_variants.json (the flags,
# each pass's fraction of copy bandwidth per variant, the commit). BENCH_ARGS replaces the benchmark's
# arguments (default: --sizes 1.3b --repeats 5 --baseline-budget-s 0.2). CXX defaults to g++.
set -euo pipefail
cd "$(dirname "$0")/.."
if (( $# < 2 )); then
  echo "usage: bash bench/gpu_variants.sh OUT_DIR NAME=FLAGS [NAME=FLAGS ...]  (e.g. default= packs2=-DFP_PACKS_PER_STEP=2)" >&2
  exit 2
fi
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd); shift
PY=$(command -v "${PYTHON:-python3}")
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute (a venv's link kept): builds run in the copies
WORK=$(mktemp -d "${TMPDIR:-/tmp}/finepurify_variants.XXXXXX")  # fresh, absolute: copies built and imported there
BENCH_ARGS="${BENCH_ARGS:---sizes 1.3b --repeats 5 --baseline-budget-s 0.2}"
# The commit that ran, "+dirty" with uncommitted changes (pass FINEPURIFY_COMMIT where the copy's git
# metadata may be stale, as on a lent GPU; gpu_check.json also records the sources' digest).
if [[ -z "${FINEPURIFY_COMMIT:-}" ]]; then
  FINEPURIFY_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && FINEPURIFY_COMMIT+="+dirty"
fi
export FINEPURIFY_COMMIT
ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "")
JOBS=$(( $(nproc) / $# > 0 ? $(nproc) / $# : 1 ))

names=()
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  names+=("$name")
  rm -f "$OUT_DIR/cuda_ops_variant_$name.json"
  mkdir -p "$WORK/$name"
  cp -r setup.py pyproject.toml README.md csrc finepurify_ext bench "$WORK/$name/"
  rm -f "$WORK/$name"/finepurify_ext/*.so
  echo "$flags" > "$WORK/$name/.flags"
  ( cd "$WORK/$name" && CXX="${CXX_OVERRIDE:-g++}" CC="${CC_OVERRIDE:-gcc}" TORCH_CUDA_ARCH_LIST="$ARCH" \
      MAX_JOBS=$JOBS FINEPURIFY_NVCC_FLAGS="$flags" "$PY" setup.py build_ext --inplace > build.log 2>&1 \
      || echo "build failed: see $WORK/$name/build.log" ) &
done
wait

for name in "${names[@]}"; do
  echo "=== $name: $(cat "$WORK/$name/.flags")"
  # A variant whose build failed must not fall back on the installed package.
  if ! (cd /tmp && PYTHONPATH="$WORK/$name" "$PY" -c "import sys, finepurify_ext as m; sys.exit(not m.__file__.startswith('$WORK/$name/'))"); then
    echo "$name: not built (see $WORK/$name/build.log)"; continue
  fi
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  PYTHONPATH="$WORK/$name" "$PY" "$WORK/$name/bench/bench_cuda.py" $BENCH_ARGS \
    --out "$OUT_DIR/cuda_ops_variant_$name.json" || echo "$name: benchmark failed"
done

"$PY" - "$OUT_DIR" "$WORK" "${names[@]}" <<'PYEOF'
import json, os, sys
out_dir, work, names = sys.argv[1], sys.argv[2], sys.argv[3:]
table, rows = {}, []
for name in names:
    path = os.path.join(out_dir, f"cuda_ops_variant_{name}.json")
    flags = open(os.path.join(work, name, ".flags")).read().strip()
    if not os.path.exists(path):
        table[name] = {"flags": flags, "failed": True}
        continue
    report = json.load(open(path))
    table[name] = {"flags": flags, "file": os.path.basename(path), "device": report["device"],
                   "fraction_of_copy_bandwidth": {f"{r['model']} {r['weight_dtype']} {r['case']}":
                                                  r.get("fraction_of_copy_bandwidth") for r in report["results"]}}
summary = {"command": "bash bench/gpu_variants.sh " + " ".join(f"{n}={table[n]['flags']}" for n in names),
           "commit": os.environ.get("FINEPURIFY_COMMIT"), "variants": table}
with open(os.path.join(out_dir, "gpu_variants.json"), "w") as f:
    json.dump(summary, f, indent=2)
cases = sorted({c for v in table.values() for c in v.get("fraction_of_copy_bandwidth", {})})
print(f"{'pass':44s}" + "".join(f"{n[:10]:>11s}" for n in names))
for c in cases:
    print(f"{c[:44]:44s}" + "".join(f"{table[n].get('fraction_of_copy_bandwidth', {}).get(c) or float('nan'):11.3f}"
                                     for n in names))
PYEOF
