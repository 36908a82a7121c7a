#!/usr/bin/env bash
# The GPU check in one command, for whoever is lent a GPU: build for this GPU's architecture only;
# the CUDA tests of the search from a sample, compute-sanitizer memcheck of the kernels changed since
# its last clean run (synccheck and racecheck of the candidates' kernel), the other CUDA tests; the benchmarks of the ops, the threshold searches and the
# pipeline (with the sample's search on the GPU where its tests passed); purify_'s host cost; the
# commands end to end with the time left. Sized to finish within FINEPURIFY_GPU_CHECK_S seconds
# (default 470, under 8 minutes) on one H100/H200; every step has its own limit and a failed step
# does not stop the others.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to bench/results
#
# Writes OUT_DIR/gpu_check.json (device, torch, commit, each step's status and summary),
# gpu_check.log, cuda_ops.json (bench/bench_cuda.py), pipeline_cuda.json (bench/bench_pipeline.py,
# with purify_'s profiler tables), gpu_e2e_llm.json (bench/gpu_e2e.py:
# `finepurify purify|hessian --device cuda` on a Llama-3.2-1B-shaped causal LM, in memory and out of
# core), host_overhead_cuda.json (bench/bench_host.py), threshold_search_cuda.json
# (bench/bench_search.py) and, with FINEPURIFY_E2E_MODEL set, gpu_e2e.json (the same on that model).
# The device tool returns at most 8 files from $OUT: a default run writes 8 (with
# pipeline_cuda_sample_search.json, where the sample search's CUDA tests pass), and each of ncu, the
# baseline, FINEPURIFY_BENCH_UNMOVED and FINEPURIFY_E2E_MODEL one more (FINEPURIFY_GPU_STEPS leaves
# steps out to make room).
# Uses python3 (or $PYTHON) as it is: no downloads. CXX defaults to the system g++ (a toolchain that
# links libstdc++ statically is refused by setup.py).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
BUDGET="${FINEPURIFY_GPU_CHECK_S:-470}"
START=$(date +%s)
LOG="$OUT_DIR/gpu_check.log"
STEPS="$OUT_DIR/.gpu_check_steps"
: > "$LOG"; : > "$STEPS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The commit that ran, "+dirty" with uncommitted changes (pass FINEPURIFY_COMMIT where the copy's git
# metadata may be stale, as on a lent GPU; gpu_check.json also records the sources' digest).
if [[ -z "${FINEPURIFY_COMMIT:-}" ]]; then
  FINEPURIFY_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && FINEPURIFY_COMMIT+="+dirty"
fi
export FINEPURIFY_COMMIT

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# FINEPURIFY_GPU_STEPS="build cuda_tests ..." runs only the steps named (a short lease: e.g. a
# follow-up after a full check); FINEPURIFY_CUDA_TESTS_K passes -k to the CUDA tests.
wanted() { [[ -z "${FINEPURIFY_GPU_STEPS:-}" || " $FINEPURIFY_GPU_STEPS " == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: runs with a time limit, logs, records rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  if ! wanted "$name"; then echo "$name skipped 0 not-asked" >> "$STEPS"; return; fi
  local remaining; remaining=$(left)
  if (( remaining < 10 )); then echo "$name skipped 0 no-time-left" >> "$STEPS"; return; fi
  (( limit > remaining )) && limit=$remaining
  echo "=== $name (limit ${limit}s, $(date -u +%T))" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 )) $limit" >> "$STEPS"
  echo "=== $name: rc $rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$LOG")
{ nvidia-smi -L; $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } >> "$LOG" 2>&1

step build 240 env CXX="${CXX_OVERRIDE:-g++}" CC="${CC_OVERRIDE:-gcc}" TORCH_CUDA_ARCH_LIST="$ARCH" \
  MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps -e .
# The CUDA tests in two steps, the search from a sample's first (its kernels, score_sample and
# score_candidates, have never run on a GPU; whether purify_ may take that search there hangs on
# them), then memcheck of the kernels changed since its last clean run, then the rest: a step cut
# short by its limit leaves no verdict, and the budget must not spend that verdict on the rest.
SAMPLE_K="candidates or sample or search or checkpoint or opcheck"
if [[ -n "${FINEPURIFY_CUDA_TESTS_K:-}" ]]; then  # a part of the CUDA tests, in one step
  step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_torch_integration.py \
    -k "$FINEPURIFY_CUDA_TESTS_K"
else
  step cuda_tests_sample 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "$SAMPLE_K"
fi
# memcheck slows every launch; it reports how far it came. By default only the CUDA tests of the
# kernels and bindings changed since the last clean memcheck (a9d20aa, every CUDA test: 0 errors):
# score_candidates and score_sample (never run yet; their own tests, unrankable inputs, the ops'
# search and its narrowing, purify_'s and out of core's search on the GPU), the histograms' shared
# key walk and the ops' bindings (opcheck).
# FINEPURIFY_MEMCHECK_K="" runs them all, as the budget allows.
MEMCHECK_K=${FINEPURIFY_MEMCHECK_K-score_candidates or score_sample or search_from_a or unrankable_inputs or score_histogram or opcheck or candidates_search or checkpoint_on_cuda}
MEMCHECK_FILTER=(); [[ -n "$MEMCHECK_K" ]] && MEMCHECK_FILTER=(-k "$MEMCHECK_K")
step memcheck 100 compute-sanitizer --tool memcheck --error-exitcode 99 \
  "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py "${MEMCHECK_FILTER[@]}"
# score_candidates appends its keys by warp votes inside a divergent branch (__activemask), and its
# block histogram by shared atomics between barriers: synccheck and racecheck on its own tests
# (seconds), which memcheck does not judge.
step synccheck 40 compute-sanitizer --tool synccheck --error-exitcode 99 \
  "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "score_candidates_match_cpu or sample_and_candidates"
step racecheck 40 compute-sanitizer --tool racecheck --error-exitcode 99 \
  "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "score_candidates_match_cpu"
if [[ -z "${FINEPURIFY_CUDA_TESTS_K:-}" ]]; then
  step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_torch_integration.py \
    -k "not ($SAMPLE_K) or torch_integration"
fi
step bench_ops 170 "$PY" bench/bench_cuda.py --repeats 5 --out "$OUT_DIR/cuda_ops.json"
# The two exact threshold searches on this GPU (bench/bench_search.py): the histogram passes against
# the sample's bracket and score_candidates passes, up to OPT-1.3B's size in bfloat16; what decides
# whether purify_ (and the distributed search) on CUDA should search from a sample (threshold.CANDIDATES_ON).
step search 60 "$PY" bench/bench_search.py --device cuda --sizes 1048576 8388608 67108864 268435456 1342177280 \
  --out "$OUT_DIR/threshold_search_cuda.json"
step bench_pipeline 120 "$PY" bench/bench_pipeline.py --device cuda --model opt-1.3b --batch 32 --seq 128 \
  --hessian-steps 8 --more-batches 4 64 --profile \
  --out "$OUT_DIR/pipeline_cuda.json"
# Whether purify_ on a GPU should search from a sample (threshold.CANDIDATES_ON leaves CUDA out until
# its CUDA tests have passed on one): where cuda_tests_sample exited 0 (that step holds those tests
# alone; FINEPURIFY_CUDA_TESTS_K, one step for both, leaves them unjudged), the pipeline's purify_
# and op at OPT-1.3B with the sample's search on this GPU (FINEPURIFY_CANDIDATES_ON), into
# pipeline_cuda_sample_search.json beside bench_pipeline's histogram passes: both in one lease.
SAMPLE_RC=$(awk '$1 == "cuda_tests_sample" {print $2}' "$STEPS")
case "$SAMPLE_RC" in
  0) VERDICT=passed ;;
  ""|skipped) VERDICT=sample-search-cuda-tests-not-run ;;
  *) VERDICT=sample-search-cuda-tests-did-not-pass ;;
esac
if [[ "$VERDICT" == passed ]]; then
  step pipeline_sample_search 60 env FINEPURIFY_CANDIDATES_ON=cpu,cuda "$PY" bench/bench_pipeline.py --device cuda \
    --model opt-1.3b --batch 32 --seq 128 --hessian-steps 1 --out "$OUT_DIR/pipeline_cuda_sample_search.json"
else
  echo "pipeline_sample_search skipped 0 $VERDICT" >> "$STEPS"
fi
# On request (FINEPURIFY_BENCH_UNMOVED=0.5): the ops at 1.3B where that fraction of the weights never
# moved, as in a bfloat16 fine-tune, into cuda_ops_unmoved.json (and the baseline below likewise).
UNMOVED_ARGS=(); [[ -n "${FINEPURIFY_BENCH_UNMOVED:-}" ]] && UNMOVED_ARGS=(--unmoved "$FINEPURIFY_BENCH_UNMOVED")
if [[ -n "${FINEPURIFY_BENCH_UNMOVED:-}" ]]; then
  step bench_unmoved 90 "$PY" bench/bench_cuda.py --sizes 1.3b --repeats 5 --baseline-budget-s 0.3 "${UNMOVED_ARGS[@]}" \
    --out "$OUT_DIR/cuda_ops_unmoved.json"
fi
# Nsight Compute's view of every kernel (bench/ncu_kernels.py), only when FINEPURIFY_GPU_STEPS names it.
if [[ " ${FINEPURIFY_GPU_STEPS:-} " == *" ncu "* ]]; then
  # and per SASS instruction, the level-0 histogram in both dtypes: where the bfloat16 one's lanes idle
  step ncu 200 "$PY" bench/ncu_kernels.py "${UNMOVED_ARGS[@]}" --sass 'score_histogram_kernel<BFloat16Bits' \
    --sass 'score_histogram_kernel<float' --out "$OUT_DIR/ncu_kernels.json"
fi
# purify_'s host cost beyond the op at OPT-1.3B's 388 tensors and tiny widths (bench/bench_host.py):
# the part of the pipeline's gap that is the host's, without the passes' device time. A diagnosis.
step host_overhead 60 "$PY" bench/bench_host.py --device cuda --repeats 20 --out "$OUT_DIR/host_overhead_cuda.json"
# The commands end to end on a 1B causal LM, with the time left (measured at a9d20aa: 38.0, 30.9 and
# 19.3 s; the out-of-core search has run on the CPU pieces since).
step e2e_llm 200 "$PY" bench/gpu_e2e.py --model "${FINEPURIFY_E2E_LLM:-llama-1b}" --timeout 120 \
  --out "$OUT_DIR/gpu_e2e_llm.json"
# On request, a same-device baseline for kernel changes: FINEPURIFY_BASELINE_DIR holds an older
# source tree (e.g. `mkdir -p bench/baseline_src && git archive 38aaa5a | tar -x -C bench/baseline_src`;
# the folder is git-ignored: name it in the device tool's `carry`; FINEPURIFY_BASELINE_COMMIT names
# the commit), built in place and benchmarked at 1.3B into cuda_ops_baseline.json.
rm -f "$OUT_DIR/cuda_ops_baseline.json"
if [[ -n "${FINEPURIFY_BASELINE_DIR:-}" && ! -d "${FINEPURIFY_BASELINE_DIR}" ]]; then
  echo "baseline_build skipped 0 no-such-dir" >> "$STEPS"
elif [[ -n "${FINEPURIFY_BASELINE_DIR:-}" ]]; then
  BASE=$(cd "$FINEPURIFY_BASELINE_DIR" && pwd)
  step baseline_build 120 bash -c "cd '$BASE' && CXX='${CXX_OVERRIDE:-g++}' CC='${CC_OVERRIDE:-gcc}' \
    TORCH_CUDA_ARCH_LIST='$ARCH' MAX_JOBS=$(nproc) '$PY' setup.py build_ext --inplace"
  # This tree's benchmark over the baseline's built package (its options, e.g. --unmoved, apply).
  step baseline_bench 90 env PYTHONPATH="$BASE" FINEPURIFY_COMMIT="${FINEPURIFY_BASELINE_COMMIT:-baseline}" "$PY" bench/bench_cuda.py \
    --sizes 1.3b --repeats 5 --baseline-budget-s 0.3 "${UNMOVED_ARGS[@]}" --out "$OUT_DIR/cuda_ops_baseline.json"
fi
# On request (FINEPURIFY_E2E_MODEL=opt-1.3b), with the time left: the classifier end to end (measured
# at fdfe467 on an H200; the steps above leave it too little time to finish).
if [[ -n "${FINEPURIFY_E2E_MODEL:-}" ]]; then
  step e2e 200 "$PY" bench/gpu_e2e.py --model "$FINEPURIFY_E2E_MODEL" --timeout 120 --out "$OUT_DIR/gpu_e2e.json"
fi

"$PY" - "$OUT_DIR" "$STEPS" "$LOG" <<'PYEOF'
import datetime, json, os, re, sys
sys.path.insert(0, "bench")
from common import source_digest
out_dir, steps_file, log_file = sys.argv[1:]
log = open(log_file, errors="replace").read()
sections = {m.group(1): m.group(2) for m in re.finditer(r"=== (\w+) \(limit[^\n]*\n(.*?)(?==== \1:)", log, re.S)}
steps = []
for line in open(steps_file):
    name, rc, seconds, *limit = line.split()
    text = sections.get(name, "")
    summary = [l for l in text.splitlines() if re.search(r"passed|failed|error|ERROR SUMMARY|MISSED|met ", l)][-12:]
    steps.append({"step": name, "rc": rc, "seconds": int(seconds), "limit_s": int(limit[0]) if limit and limit[0].isdigit() else None,
                  "timed_out": rc in ("124", "137"), "summary": summary})
try:
    import torch
    device, version = torch.cuda.get_device_name(), torch.__version__
except Exception as error:
    device, version = f"unknown ({error})", None
report = {"command": "bash bench/gpu_check.sh", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": os.environ.get("FINEPURIFY_COMMIT"), "source_digest": source_digest(), "device": device,
          "torch": version,
          # what the run was asked for (steps, budget, baseline tree, unmoved fraction), to rerun it
          "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FINEPURIFY_") or k.endswith("_OVERRIDE")},
          "steps": steps}
with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=2)
for s in steps:
    print(f"{s['step']:16s} rc {s['rc']:>4s} {s['seconds']:4d}s  " + (s["summary"][-1] if s["summary"] else ""))
PYEOF
rm -f "$STEPS"
